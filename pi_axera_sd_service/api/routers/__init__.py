"""HTTP routers: generate, sdapi, internal."""
