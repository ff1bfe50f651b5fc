"""compression: codecs that encode layers at split time and decode them on the device."""

import logging


class _NoKernelsHubHint(logging.Filter):
    """Drops bitsandbytes' advice to `pip install kernels` on AVX512-BF16 CPUs.

    That package fetches its kernels from a model hub at run time, which an offline benchmark must
    not do; bitsandbytes then uses its own CPU path, which is what we measure anyway.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in record.getMessage()


# Installed when the codecs' package is first imported, before any codec imports bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHubHint())
