"""SimPO preference optimization on NVIDIA Megatron-Core."""

__version__ = "0.1.0"
