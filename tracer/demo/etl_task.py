"""A small ETL task shaped like the leaks that get Airflow and Celery workers OOM-killed.

- `_PARTITION_CACHE` is a module-level cache that is never cleared: every run of `load_partition` adds a
  64 KiB payload under a new key. This is the leak: it keeps allocating and never frees.
- `_RESULTS` is a large list built once and kept until the end: big, old, but not growing.
- `transform` allocates 1 MiB scratch buffers and drops them at once: churn, nothing held.

`cargo xtask run` traces it with `alloctrace leaks`; the cache's allocation site comes first in the report.
"""

import time

# A worker that keeps going: `cargo xtask run` reports after a few seconds, while the cache is still growing
# (at a normal exit the interpreter's finalization frees it, hiding the leak).
PARTITIONS = 3000
PAYLOAD_BYTES = 64 * 1024

_PARTITION_CACHE = {}
_RESULTS = []


def load_partition(day):
    # 8-byte row keys, 8192 of them: exactly 64 KiB of payload per partition.
    payload = b"%08d" % day * (PAYLOAD_BYTES // 8)
    _PARTITION_CACHE[day] = payload
    return payload


def transform(payload):
    scratch = bytearray(1024 * 1024)
    scratch[: len(payload)] = payload
    return len(scratch)


def main():
    _RESULTS.extend(range(100_000))
    for day in range(PARTITIONS):
        transform(load_partition(day))
        time.sleep(0.004)
    print(
        f"etl_task: cached {len(_PARTITION_CACHE)} partitions of {PAYLOAD_BYTES} bytes, "
        f"kept {len(_RESULTS)} results"
    )


if __name__ == "__main__":
    main()
