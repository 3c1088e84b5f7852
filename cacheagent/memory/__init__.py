"""Host memory and GPUs: page-cache warming, residency, memory locks, NUMA placement, NVML."""
