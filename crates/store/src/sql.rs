//! Hand-written statements for the hot paths (claiming, completing), where one statement per
//! batch matters more than what the query builder can express portably. Placeholders follow
//! the backend: `$1, $2…` on PostgreSQL, `?` on SQLite.

use sea_orm::{DbBackend, Statement, Value};

pub(crate) struct Sql {
    backend: DbBackend,
    text: String,
    values: Vec<Value>,
}

impl Sql {
    pub fn new(backend: DbBackend) -> Self {
        Self {
            backend,
            text: String::new(),
            values: Vec::new(),
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.backend == DbBackend::Postgres
    }

    /// Appends SQL text.
    pub fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// SQLite: ` INDEXED BY index` — for a partial index its planner, without statistics,
    /// would pass over for a wider one (and a statement that cannot use it then fails to
    /// prepare instead of scanning). Nothing on PostgreSQL, which plans from statistics.
    pub fn indexed_by(&mut self, index: &str) -> &mut Self {
        if !self.is_postgres() {
            self.text.push_str(" INDEXED BY ");
            self.text.push_str(index);
        }
        self
    }

    /// Appends a placeholder bound to `value`.
    pub fn bind(&mut self, value: impl Into<Value>) -> &mut Self {
        self.values.push(value.into());
        if self.is_postgres() {
            self.text.push_str(&format!("${}", self.values.len()));
        } else {
            self.text.push('?');
        }
        self
    }

    /// Appends `(p1, p2, …)` bound to the values; callers never pass an empty list.
    pub fn bind_list<V: Into<Value>>(&mut self, values: impl IntoIterator<Item = V>) -> &mut Self {
        self.text.push('(');
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.text.push_str(", ");
            }
            self.bind(value);
        }
        self.text.push(')');
        self
    }

    pub fn build(self) -> Statement {
        Statement::from_sql_and_values(self.backend, self.text, self.values)
    }
}
