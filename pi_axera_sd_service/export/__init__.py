"""Model export toolchain (optional extra `export`: torch, diffusers, transformers, onnx); never imported by serve."""
