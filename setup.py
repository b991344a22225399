from setuptools import Extension, setup

# The hot loops of the spool ring, the record's marshal and the listener's formatting in C.
# Optional: where it cannot be built (no compiler, no Python headers) the install goes on and
# mplog runs the same code in Python, slower (mplog/_compiled.py).
setup(ext_modules=[Extension("mplog._speedups", ["mplog/_speedups.c"], optional=True)])
