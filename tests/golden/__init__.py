"""Golden loss curves: the stored `<task>.json` curves and, in `curves.py`, the runs that make and check them."""
