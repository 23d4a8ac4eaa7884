//! What a caller may do: permissions named like the Rails Tasker's `resource:action` strings,
//! and the namespaces a caller may see.

use std::collections::BTreeSet;

/// One permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    TaskIndex,
    TaskShow,
    TaskCreate,
    TaskUpdate,
    TaskCancel,
    TaskRetry,
    StepIndex,
    StepShow,
    StepUpdate,
    StepCancel,
    StepRetry,
    StepResolve,
    TemplateIndex,
    TemplateShow,
    TemplateRegister,
    ScheduleIndex,
    ScheduleCreate,
    ScheduleUpdate,
    ScheduleDelete,
    EventSubscribe,
    WorkerClaim,
    HealthStatusIndex,
    MetricsIndex,
}

impl Permission {
    pub const ALL: [Permission; 23] = [
        Permission::TaskIndex,
        Permission::TaskShow,
        Permission::TaskCreate,
        Permission::TaskUpdate,
        Permission::TaskCancel,
        Permission::TaskRetry,
        Permission::StepIndex,
        Permission::StepShow,
        Permission::StepUpdate,
        Permission::StepCancel,
        Permission::StepRetry,
        Permission::StepResolve,
        Permission::TemplateIndex,
        Permission::TemplateShow,
        Permission::TemplateRegister,
        Permission::ScheduleIndex,
        Permission::ScheduleCreate,
        Permission::ScheduleUpdate,
        Permission::ScheduleDelete,
        Permission::EventSubscribe,
        Permission::WorkerClaim,
        Permission::HealthStatusIndex,
        Permission::MetricsIndex,
    ];

    pub fn as_str(self) -> &'static str {
        use Permission::*;
        match self {
            TaskIndex => "tasker.task:index",
            TaskShow => "tasker.task:show",
            TaskCreate => "tasker.task:create",
            TaskUpdate => "tasker.task:update",
            TaskCancel => "tasker.task:cancel",
            TaskRetry => "tasker.task:retry",
            StepIndex => "tasker.workflow_step:index",
            StepShow => "tasker.workflow_step:show",
            StepUpdate => "tasker.workflow_step:update",
            StepCancel => "tasker.workflow_step:cancel",
            StepRetry => "tasker.workflow_step:retry",
            StepResolve => "tasker.workflow_step:resolve",
            TemplateIndex => "tasker.template:index",
            TemplateShow => "tasker.template:show",
            TemplateRegister => "tasker.template:register",
            ScheduleIndex => "tasker.schedule:index",
            ScheduleCreate => "tasker.schedule:create",
            ScheduleUpdate => "tasker.schedule:update",
            ScheduleDelete => "tasker.schedule:delete",
            EventSubscribe => "tasker.event:subscribe",
            WorkerClaim => "tasker.worker:claim",
            HealthStatusIndex => "tasker.health_status:index",
            MetricsIndex => "tasker.metrics:index",
        }
    }

    /// The permissions a pattern grants: an exact name, `resource:*` or `*`; `None` when it
    /// names nothing in the catalog.
    pub fn matching(pattern: &str) -> Option<Vec<Permission>> {
        let granted: Vec<Permission> = if pattern == "*" {
            Self::ALL.to_vec()
        } else if let Some(resource) = pattern.strip_suffix(":*") {
            Self::ALL
                .into_iter()
                .filter(|p| p.as_str().split(':').next() == Some(resource))
                .collect()
        } else {
            Self::ALL
                .into_iter()
                .filter(|p| p.as_str() == pattern)
                .collect()
        };
        (!granted.is_empty()).then_some(granted)
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions(BTreeSet<Permission>);

impl Permissions {
    pub fn all() -> Permissions {
        Permissions(Permission::ALL.into_iter().collect())
    }

    /// Every permission the patterns grant; the patterns that name nothing are returned
    /// apart, so a configuration can refuse them and a token can ignore them.
    pub fn from_patterns<'a>(
        patterns: impl IntoIterator<Item = &'a str>,
    ) -> (Permissions, Vec<&'a str>) {
        let mut set = BTreeSet::new();
        let mut unknown = Vec::new();
        for pattern in patterns {
            match Permission::matching(pattern) {
                Some(granted) => set.extend(granted),
                None => unknown.push(pattern),
            }
        }
        (Permissions(set), unknown)
    }

    pub fn contains(&self, permission: Permission) -> bool {
        self.0.contains(&permission)
    }

    pub fn extend(&mut self, other: &Permissions) {
        self.0.extend(other.0.iter().copied());
    }

    pub fn iter(&self) -> impl Iterator<Item = Permission> + '_ {
        self.0.iter().copied()
    }
}

/// The namespaces a caller may see: all of them, or a list (possibly empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceScope {
    All,
    Only(BTreeSet<String>),
}

impl NamespaceScope {
    /// From a `namespaces` claim: `["*"]` means all.
    pub fn from_claim<'a>(names: impl IntoIterator<Item = &'a str>) -> NamespaceScope {
        let mut only = BTreeSet::new();
        for name in names {
            if name == "*" {
                return NamespaceScope::All;
            }
            only.insert(name.to_owned());
        }
        NamespaceScope::Only(only)
    }

    pub fn allows(&self, namespace: &str) -> bool {
        match self {
            NamespaceScope::All => true,
            NamespaceScope::Only(names) => names.contains(namespace),
        }
    }

    /// Where a query that asked to look `asked` may look: the part of it in scope. `None`
    /// when that leaves nothing: the caller gets an empty answer without a query.
    pub fn confine(&self, asked: &Within) -> Option<Within> {
        match (self, asked) {
            (NamespaceScope::All, asked) => Some(asked.clone()),
            (NamespaceScope::Only(names), Within::Any) => {
                NamespaceSet::new(names.iter().cloned()).map(Within::Only)
            }
            (NamespaceScope::Only(names), Within::Only(asked)) => {
                NamespaceSet::new(asked.iter().filter(|name| names.contains(*name)).cloned())
                    .map(Within::Only)
            }
        }
    }
}

/// Where a query may look: every namespace, or some. There is no "none": a caller whose scope
/// leaves nothing to look in is answered without asking the database, so no filter can mean
/// "nothing" by mistake, nor "everything" by an empty list. Nor is there a default: every
/// filter states its scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Within {
    Any,
    Only(NamespaceSet),
}

impl Within {
    /// The namespaces a caller asked for: any when it named none.
    pub fn of(names: impl IntoIterator<Item = String>) -> Within {
        NamespaceSet::new(names).map_or(Within::Any, Within::Only)
    }

    pub fn allows(&self, namespace: &str) -> bool {
        match self {
            Within::Any => true,
            Within::Only(names) => names.contains(namespace),
        }
    }
}

/// A non-empty set of namespace names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespaceSet(BTreeSet<String>);

impl NamespaceSet {
    /// The set of these names; `None` when there are none.
    pub fn new(names: impl IntoIterator<Item = String>) -> Option<NamespaceSet> {
        let set: BTreeSet<String> = names.into_iter().collect();
        (!set.is_empty()).then_some(NamespaceSet(set))
    }

    /// The set of one name.
    pub fn one(name: impl Into<String>) -> NamespaceSet {
        NamespaceSet(BTreeSet::from([name.into()]))
    }

    pub fn contains(&self, namespace: &str) -> bool {
        self.0.contains(namespace)
    }

    pub fn iter(&self) -> impl Iterator<Item = &String> {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_resource_action_pairs() {
        let mut names: Vec<_> = Permission::ALL.iter().map(|p| p.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Permission::ALL.len());
        assert!(
            names
                .iter()
                .all(|n| n.starts_with("tasker.") && n.contains(':'))
        );
    }

    #[test]
    fn patterns_grant_exact_names_resources_or_everything() {
        let (granted, unknown) = Permissions::from_patterns([
            "tasker.task:show",
            "tasker.workflow_step:*",
            "tasker.nothing:index",
        ]);
        assert!(granted.contains(Permission::TaskShow));
        assert!(!granted.contains(Permission::TaskCreate));
        assert!(granted.contains(Permission::StepResolve));
        assert_eq!(unknown, ["tasker.nothing:index"]);
        assert_eq!(Permissions::from_patterns(["*"]).0, Permissions::all());
    }

    #[test]
    fn scopes_confine_what_is_asked() {
        let scope = NamespaceScope::from_claim(["payments", "billing"]);
        assert!(scope.allows("payments") && !scope.allows("shop"));
        let only = |names: &[&str]| {
            NamespaceSet::new(names.iter().map(|n| (*n).to_owned())).map(Within::Only)
        };
        let asked = |names: &[&str]| Within::of(names.iter().map(|n| (*n).to_owned()));
        assert_eq!(
            scope.confine(&asked(&["shop", "billing"])),
            only(&["billing"])
        );
        assert_eq!(scope.confine(&asked(&[])), only(&["billing", "payments"]));
        assert_eq!(
            scope.confine(&asked(&["shop"])),
            None,
            "nothing left to look in"
        );
        assert_eq!(
            NamespaceScope::from_claim(["*"]).confine(&asked(&[])),
            Some(Within::Any),
            "no restriction"
        );
        assert_eq!(
            NamespaceScope::from_claim(["*"]).confine(&asked(&["shop"])),
            only(&["shop"])
        );
        assert_eq!(
            NamespaceScope::from_claim([]).confine(&asked(&[])),
            None,
            "an empty scope sees nothing"
        );
        assert_eq!(NamespaceSet::new(Vec::new()), None, "no empty set");
        assert_eq!(
            Some(Within::Only(NamespaceSet::one("shop"))),
            only(&["shop"])
        );
    }
}
