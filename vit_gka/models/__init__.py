"""The model families in timm's registry (importing this registers them)."""
from vit_gka.models import compact_deit, gka_deit  # noqa: F401
