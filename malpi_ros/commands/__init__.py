"""One module per `malpi-ros` verb (see malpi_ros.cli)."""
