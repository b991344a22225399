from setuptools import Extension, setup

# The spool ring's hot loops in C. Optional: where it cannot be built (no compiler, no Python
# headers) the install goes on and mplog runs the same code in Python (mplog/_spool.py), slower.
setup(ext_modules=[Extension("mplog._speedups", ["mplog/_speedups.c"], optional=True)])
