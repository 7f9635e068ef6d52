"""The demonstration and the stand-ins it runs the daemon against; the daemon never imports this package.

`reconciler demo` (`run`, `scenario`, `view`), the simulated provisioner of `reconciler simulate-provisioner`
(`simulated_provisioner`), the embedded PostgreSQL server (`embedded_postgres`, also used by the tests and
the benchmark), and the platform's side of the database that they write (`platform`, over
`sql/queries/platform.sql`).
"""
