"""Which providers are "found": pyaxengine looks for libaxcl_rt / libax_engine; here an env var decides.

With both found, AXCLRT comes first only when /dev/axcl_host exists (pyaxengine 0.1.3.rc3).
`providers` is read by get_available_providers() at each call, so tests may replace it.
"""

from __future__ import annotations

import os

axengine_provider_name = "AxEngineExecutionProvider"
axclrt_provider_name = "AXCLRTExecutionProvider"
AXCL_HOST_DEVICE = "/dev/axcl_host"


def _found() -> list[str]:
    listed = os.environ.get("FAKE_AXENGINE_PROVIDERS")
    if listed is not None:
        return [name.strip() for name in listed.split(",") if name.strip()]
    if os.path.exists(AXCL_HOST_DEVICE):
        return [axclrt_provider_name, axengine_provider_name]
    return [axengine_provider_name, axclrt_provider_name]


providers: list[str] = _found()


def get_all_providers() -> list[str]:
    return [axengine_provider_name, axclrt_provider_name]


def get_available_providers() -> list[str]:
    return providers
