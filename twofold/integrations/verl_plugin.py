"""Imported by verl itself: twofold declares this module as a "verl.plugins" entry point, and `import verl` loads
every such plugin in each process (driver and Ray workers), so an installed twofold registers its losses there
without any code in the user's job. (verl skips a plugin that fails to load; `register()` by hand then says why.)"""
from twofold.integrations.verl import register

register()
