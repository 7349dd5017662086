"""The process and the machine it runs on: CPU threads and allocator, disks, locks, the compute dtype, signals, clocks."""
