//! SeaORM entities: the table shapes. They stay inside the store; callers get the records of
//! `records.rs`, so the API schema never mirrors a table.

pub mod namespace {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "namespaces")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        #[sea_orm(unique)]
        pub name: String,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod task_template {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "task_templates")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub namespace: String,
        pub name: String,
        pub version: String,
        pub description: Option<String>,
        #[sea_orm(column_type = "JsonBinary")]
        pub definition: Json,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod task {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "tasks")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub namespace: String,
        pub template_id: Uuid,
        pub template_name: String,
        pub template_version: String,
        pub state: String,
        #[sea_orm(column_type = "JsonBinary")]
        pub context: Json,
        pub initiator: Option<String>,
        pub source_system: Option<String>,
        pub reason: Option<String>,
        #[sea_orm(column_type = "JsonBinary")]
        pub tags: Json,
        pub idempotency_key: Option<String>,
        pub correlation_id: Option<String>,
        pub version: i32,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
        pub completed_at: Option<DateTimeUtc>,
        /// The creating span's W3C trace context, when traces are exported.
        pub traceparent: Option<String>,
        /// 1 (low) to 4 (urgent); its steps' unless they declare their own.
        pub priority: i32,
        /// `namespace/template[:rendered key]` when its template limits concurrency.
        pub concurrency_key: Option<String>,
        pub concurrency_limit: Option<i32>,
        /// `waiting`, `held` or `freed`, with a concurrency key.
        pub slot: Option<String>,
        /// When it times out (epoch ms), if its template has a timeout.
        pub deadline_ms: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod schedule {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "schedules")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub namespace: String,
        pub name: String,
        pub template_name: String,
        pub template_version: Option<String>,
        #[sea_orm(column_type = "JsonBinary")]
        pub context: Json,
        pub priority: Option<i32>,
        pub cron: Option<String>,
        pub timezone: String,
        pub run_at_ms: Option<i64>,
        pub catch_up: String,
        pub paused: bool,
        /// The first tick not fired yet; `None` once a one-time schedule fired.
        pub next_fire_ms: Option<i64>,
        pub last_fired_ms: Option<i64>,
        pub fired_count: i64,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod task_tag {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "task_tags")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub task_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub tag: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod workflow_step {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "workflow_steps")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub task_id: Uuid,
        pub position: i32,
        pub name: String,
        pub handler: String,
        pub description: Option<String>,
        #[sea_orm(column_type = "JsonBinary")]
        pub config: Json,
        pub state: String,
        pub attempts: i32,
        pub max_attempts: i32,
        pub retryable: bool,
        pub skippable: bool,
        #[sea_orm(column_type = "JsonBinary")]
        pub backoff: Json,
        pub timeout_ms: Option<i64>,
        /// Parents not yet complete, skipped or resolved: the step is blocked while above zero.
        pub pending_parents: i32,
        #[sea_orm(column_type = "JsonBinary", nullable)]
        pub results: Option<Json>,
        pub last_error: Option<String>,
        /// When a failed step may run again (epoch ms); empty for a failure that is final.
        pub next_attempt_ms: Option<i64>,
        pub attempt_started_ms: Option<i64>,
        /// When the running attempt times out (epoch ms), if the step has a timeout.
        pub deadline_ms: Option<i64>,
        pub lease_token: Option<Uuid>,
        pub lease_holder: Option<String>,
        pub lease_expires_ms: Option<i64>,
        pub version: i32,
        /// When the step last became claimable, or will (its retry time), in epoch ms.
        pub ready_since_ms: Option<i64>,
        /// 1 (low) to 4 (urgent): with `ready_since_ms`, the order claims take it in.
        pub priority: i32,
        /// How long it may wait, claimable, for a worker (ms), if its template says.
        pub start_timeout_ms: Option<i64>,
        /// The rate limit bucket its attempts draw from, and its rule: at most
        /// `rate_limit_tokens` starts per `rate_limit_per_ms`.
        pub rate_limit: Option<String>,
        pub rate_limit_tokens: Option<i32>,
        pub rate_limit_per_ms: Option<i64>,
        /// The concurrency bucket its attempts count in, and how many may run at once.
        pub concurrency_bucket: Option<String>,
        pub concurrency_limit: Option<i32>,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
        pub completed_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod workflow_step_edge {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "workflow_step_edges")]
    pub struct Model {
        pub task_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub parent_step_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub child_step_id: Uuid,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod task_transition {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "task_transitions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub task_id: Uuid,
        pub from_state: Option<String>,
        pub to_state: String,
        pub sort_key: i32,
        #[sea_orm(column_type = "JsonBinary")]
        pub metadata: Json,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod step_transition {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "step_transitions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub step_id: Uuid,
        pub task_id: Uuid,
        pub from_state: Option<String>,
        pub to_state: String,
        pub sort_key: i32,
        #[sea_orm(column_type = "JsonBinary")]
        pub metadata: Json,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod event {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "events")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub position: i64,
        #[sea_orm(unique)]
        pub id: Uuid,
        pub name: String,
        pub namespace: Option<String>,
        pub task_id: Option<Uuid>,
        pub step_id: Option<Uuid>,
        #[sea_orm(column_type = "JsonBinary")]
        pub payload: Json,
        pub occurred_at: DateTimeUtc,
        /// PostgreSQL: the commit-ordered number the sequencer gave it; SQLite: empty.
        pub sequence: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
