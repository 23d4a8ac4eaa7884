# Developer shortcuts. Never required: the README's commands are plain cargo.

pg_url := "postgres://postgres@127.0.0.1:5432/test"

# Run the server with the default SQLite database and the playground.
run:
    cargo run

# The whole test suite on SQLite.
test:
    cargo test

# The whole test suite on SQLite and PostgreSQL.
test-pg:
    TASKER_TEST_DATABASE_URL={{pg_url}} cargo test

# Regenerate schema.graphql after changing the API.
schema:
    cargo run -q -- schema > schema.graphql

# What CI runs.
ci:
    bash .ci/run
