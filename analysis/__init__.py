"""The keepalive model, expectations, verdicts and reports. Pure: no I/O here."""
