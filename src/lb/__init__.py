"""The load-balancing endpoint (`ENDPOINT_TYPE=lb`): the worker as an HTTP server, a third door
onto the job flow."""
