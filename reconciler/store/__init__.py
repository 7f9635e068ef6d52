"""Data access of the daemon: one module per file of `sql/queries/`, typed functions over its named statements.

`reads` is what a pass reads (reads.sql), `writes` writes it and the operator's commands (writes.sql),
`notifications` is the outbox (notifications.sql), `memberships` the prebuilds user's organization and
group memberships (memberships.sql). Only these modules, and `reconciler/demo/platform.py`
for the demo's side of the database, run SQL; each loads only its own file.
"""
