"""Byte counts as people read them in reports and estimates."""


def format_bytes(size: int) -> str:
    """GiB with two decimals from 1 GiB on, whole MiB below that (KiB under 1 MiB: tiny models)."""
    if size >= 2**30:
        return f"{size / 2**30:.2f} GiB"
    if size >= 2**20 or size == 0:
        return f"{size / 2**20:.0f} MiB"
    return f"{size / 2**10:.0f} KiB"
