"""kaobs: a packet-level TCP keepalive observer for PostgreSQL."""
