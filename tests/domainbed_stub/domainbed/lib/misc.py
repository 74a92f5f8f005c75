"""Stand-in for domainbed.lib.misc: only seed_hash."""
import hashlib


def seed_hash(*args):
    """A 31-bit integer seed derived from the arguments' repr."""
    digest = hashlib.md5(repr(args).encode("utf-8")).hexdigest()
    return int(digest, 16) % (2 ** 31)
