"""verl bugs fixed at run time, each applied only when a probe shows the bug (``patches/`` holds the diffs)."""
