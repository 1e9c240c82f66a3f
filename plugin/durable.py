"""Files that survive a power cut: written under a temporary name, fsync'd, renamed, and the
folder entry fsync'd (`models.durable` holds the code; `trainer` and `models` write through it
too, and may not import `plugin`).

Every file the service promises to keep (a received instance, a result object, a copy in a
destination folder) goes through here, so a reader sees a complete file or none, and a file
the database records is on disk before the commit that records it.
"""

from models.durable import fsync_dir, make_dirs, remove_temporaries, write_atomically

__all__ = ["fsync_dir", "make_dirs", "remove_temporaries", "write_atomically"]
