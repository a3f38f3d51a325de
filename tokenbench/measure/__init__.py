"""The measurements, one kind per module; each is a function of (model, settings) that leaves
the model as it found it.

- :mod:`.env`: where and with what a figure is measured (device, CPU, threads, versions);
  :mod:`.busy`: whether other processes take the machine while it is measured;
- :mod:`.forward`: the conditions of a measured forward (eval mode, input, precision);
- :mod:`.flop_count`: FLOPs (fvcore's rules), parameters, tokens per block;
  :mod:`.flops_dispatch`: fvcore's rules read on the dispatcher (many images in seconds);
- :mod:`.timing`: throughput, batch-1 latency and the paired speedup, on the shared timing
  machinery of :mod:`.timed_forward`, with :mod:`.compilation` (``torch.compile``) and
  :mod:`.graphs` (CUDA graphs) as timing modes; :mod:`.overhead`: operators and host time
  per forward;
- :mod:`.memory`: peak memory, what a batch needs, the largest batch that fits;
- :mod:`.accuracy`: top-1 / top-5 with their intervals; :mod:`.stats`: the statistics
  (Wilson interval, McNemar test, percentiles);
- :mod:`.dense`: mIoU, pixel accuracy and per-class IoU with bootstrap intervals, the paired
  per-image IoU test, the FLOPs of encoder and decoder.
"""
