"""``curvefs bench``: fio against a mount beside a local baseline, with charts.

- ``suite``    the job list (``benchmarks/*.fio``), targets (a directory with optional
               remount/cold/stats hooks), the fio runner and its JSON parsing
- ``report``   the table, ``results.json`` and the PNG charts
- ``netenv``   an S3 server in its own network namespace behind a veth pair, a
               bandwidth cap (tbf) and object-storage latency (netem or a delay proxy)
- ``delayproxy`` the TCP proxy that adds the latency where the kernel has no netem
- ``systems``  how to format/mount/unmount curvefs and the file systems we compare with
- ``envrun``   the one-command environment: namespace, S3, volume, mounts, suite, teardown

Nothing here is imported by the file system itself.
"""
