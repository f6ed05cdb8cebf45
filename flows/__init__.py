"""safeport: flows."""

from safeport.flows import ephemeral

ephemeral.install()  # Prefect's temporary API server dies with the process that started it
