"""The process and the machine it runs on; nothing here knows of models or data.

  cpu        thread and allocator settings for CPU runs, made before JAX starts
  malloc     the C allocator: returning freed memory to the system
  disk       a full disk and other failed writes, named with the path and the space needed and free
  locks      one writer per folder: a lock that a killed holder gives up
  precision  the compute dtype `auto` stands for on this machine, and why (GPTJAX_HARDWARE injects it)
  signals    Ctrl-C and SIGTERM as a request to stop at the next step boundary
  timing     median wall time, time spent compiling, durations as people read them
"""
