"""`kaobs lab`: a Postgres server in Docker, a persistent client, a fault, and the verdict.

scenario: the experiment as data; plan: its timing, from the kernel timer;
docker: the containers, network and faults; run: one run, live; command:
the command line; client: the psycopg client that runs in the client's
network namespace.
"""
