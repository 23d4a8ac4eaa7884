//! The dependency graph of a task's steps: topological order, dependency levels, roots,
//! leaves, and the cycles that make a definition invalid. Nodes are indices `0..n`; an edge
//! `(parent, child)` means the child depends on the parent. Everything is iterative, so a
//! deep chain cannot overflow the stack.

use std::collections::VecDeque;

/// A directed graph over step indices, with both adjacency directions kept.
#[derive(Debug, Clone)]
pub struct Dag {
    parents: Vec<Vec<usize>>,
    children: Vec<Vec<usize>>,
}

impl Dag {
    /// Builds the graph over `keys` (node `i` is `keys[i]`) from edges between keys (parent,
    /// child); edges naming a key not in `keys` are ignored.
    pub fn from_keys<K: std::hash::Hash + Eq + Copy>(
        keys: &[K],
        edges: impl IntoIterator<Item = (K, K)>,
    ) -> Self {
        let index: std::collections::HashMap<K, usize> =
            keys.iter().enumerate().map(|(i, key)| (*key, i)).collect();
        let edges: Vec<(usize, usize)> = edges
            .into_iter()
            .filter_map(|(parent, child)| Some((*index.get(&parent)?, *index.get(&child)?)))
            .collect();
        Dag::new(keys.len(), edges)
    }

    /// Builds the graph; edges naming a node outside `0..node_count` are ignored.
    pub fn new(node_count: usize, edges: impl IntoIterator<Item = (usize, usize)>) -> Self {
        let mut parents = vec![Vec::new(); node_count];
        let mut children = vec![Vec::new(); node_count];
        for (parent, child) in edges {
            if parent < node_count && child < node_count {
                parents[child].push(parent);
                children[parent].push(child);
            }
        }
        for list in parents.iter_mut().chain(children.iter_mut()) {
            list.sort_unstable();
            list.dedup();
        }
        Self { parents, children }
    }

    pub fn node_count(&self) -> usize {
        self.parents.len()
    }

    pub fn parents(&self, node: usize) -> &[usize] {
        &self.parents[node]
    }

    pub fn children(&self, node: usize) -> &[usize] {
        &self.children[node]
    }

    /// Nodes with no parents, in index order.
    pub fn roots(&self) -> Vec<usize> {
        (0..self.node_count())
            .filter(|&n| self.parents[n].is_empty())
            .collect()
    }

    /// Nodes with no children, in index order.
    pub fn leaves(&self) -> Vec<usize> {
        (0..self.node_count())
            .filter(|&n| self.children[n].is_empty())
            .collect()
    }

    /// A topological order (parents before children, ties broken by index), or `None` when the
    /// graph has a cycle.
    pub fn topological_order(&self) -> Option<Vec<usize>> {
        let mut remaining: Vec<usize> = self.parents.iter().map(Vec::len).collect();
        let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<usize>> = remaining
            .iter()
            .enumerate()
            .filter(|(_, count)| **count == 0)
            .map(|(node, _)| std::cmp::Reverse(node))
            .collect();
        let mut order = Vec::with_capacity(self.node_count());
        while let Some(std::cmp::Reverse(node)) = ready.pop() {
            order.push(node);
            for &child in &self.children[node] {
                remaining[child] -= 1;
                if remaining[child] == 0 {
                    ready.push(std::cmp::Reverse(child));
                }
            }
        }
        (order.len() == self.node_count()).then_some(order)
    }

    /// Each node's dependency level: roots are 0, every other node is one more than its deepest
    /// parent (the longest path from a root). `None` when the graph has a cycle.
    pub fn levels(&self) -> Option<Vec<usize>> {
        let order = self.topological_order()?;
        let mut level = vec![0; self.node_count()];
        for node in order {
            level[node] = self.parents[node]
                .iter()
                .map(|&parent| level[parent] + 1)
                .max()
                .unwrap_or(0);
        }
        Some(level)
    }

    /// Nodes grouped by level: `result[l]` lists the nodes at level `l`, in index order.
    pub fn nodes_by_level(&self) -> Option<Vec<Vec<usize>>> {
        let levels = self.levels()?;
        let depth = levels.iter().max().map_or(0, |deepest| deepest + 1);
        let mut grouped = vec![Vec::new(); depth];
        for (node, level) in levels.into_iter().enumerate() {
            grouped[level].push(node);
        }
        Some(grouped)
    }

    /// The heaviest path from a root to a leaf, where each node weighs `weights[node]`, and
    /// its total. `None` when the graph has a cycle. Ties go to the lower index.
    pub fn longest_path(&self, weights: &[f64]) -> Option<(Vec<usize>, f64)> {
        let order = self.topological_order()?;
        let weight = |node: usize| weights.get(node).copied().unwrap_or(0.0).max(0.0);
        let mut best = vec![0.0; self.node_count()];
        let mut via: Vec<Option<usize>> = vec![None; self.node_count()];
        for &node in &order {
            let mut incoming = 0.0;
            for &parent in &self.parents[node] {
                if via[node].is_none() || best[parent] > incoming {
                    incoming = best[parent];
                    via[node] = Some(parent);
                }
            }
            best[node] = incoming + weight(node);
        }
        let end = self
            .leaves()
            .into_iter()
            .fold(None, |best_end: Option<usize>, node| match best_end {
                Some(current) if best[current] >= best[node] => Some(current),
                _ => Some(node),
            })?;
        let mut path = vec![end];
        while let Some(previous) = via[*path.last().unwrap_or(&end)] {
            path.push(previous);
        }
        path.reverse();
        Some((path, best[end]))
    }

    /// `start` and every node that depends on it, directly or transitively, in ascending
    /// order: what a re-run from `start` resets.
    pub fn descendants(&self, start: usize) -> Vec<usize> {
        if start >= self.node_count() {
            return Vec::new();
        }
        let mut seen = vec![false; self.node_count()];
        seen[start] = true;
        let mut stack = vec![start];
        while let Some(node) = stack.pop() {
            for &child in &self.children[node] {
                if !seen[child] {
                    seen[child] = true;
                    stack.push(child);
                }
            }
        }
        (0..self.node_count()).filter(|&node| seen[node]).collect()
    }

    /// For every node, how many nodes depend on it directly or transitively.
    pub fn descendant_counts(&self) -> Vec<usize> {
        let n = self.node_count();
        let mut seen = vec![usize::MAX; n];
        (0..n)
            .map(|start| {
                let mut stack = self.children[start].clone();
                let mut count = 0;
                while let Some(node) = stack.pop() {
                    if seen[node] == start {
                        continue;
                    }
                    seen[node] = start;
                    count += 1;
                    stack.extend(self.children[node].iter().copied());
                }
                count
            })
            .collect()
    }

    /// One cycle for every strongly connected component that has one, each given as the nodes
    /// along it with the first node repeated at the end (`a -> b -> c -> a`). Empty for a DAG.
    pub fn cycles(&self) -> Vec<Vec<usize>> {
        let components = self.strongly_connected_components();
        let mut cycles = Vec::new();
        for component in components {
            let single_without_loop = component.len() == 1 && {
                let node = component[0];
                !self.children[node].contains(&node)
            };
            if single_without_loop {
                continue;
            }
            let mut members = vec![false; self.node_count()];
            for &node in &component {
                members[node] = true;
            }
            cycles.push(self.cycle_within(&component, &members));
        }
        cycles.sort();
        cycles
    }

    /// Walks from the component's smallest node along children inside the component until a
    /// node repeats; in a strongly connected component every node has such a child.
    fn cycle_within(&self, component: &[usize], members: &[bool]) -> Vec<usize> {
        let start = component.iter().copied().min().unwrap_or(0);
        let mut position = vec![usize::MAX; self.node_count()];
        let mut path = Vec::new();
        let mut node = start;
        loop {
            if position[node] != usize::MAX {
                let mut cycle = path[position[node]..].to_vec();
                cycle.push(node);
                return cycle;
            }
            position[node] = path.len();
            path.push(node);
            match self.children[node].iter().find(|&&child| members[child]) {
                Some(&next) => node = next,
                None => return path,
            }
        }
    }

    /// Tarjan's algorithm, iteratively.
    fn strongly_connected_components(&self) -> Vec<Vec<usize>> {
        let n = self.node_count();
        let mut index = vec![usize::MAX; n];
        let mut low = vec![0; n];
        let mut on_stack = vec![false; n];
        let mut stack = Vec::new();
        let mut components = Vec::new();
        let mut next_index = 0;
        for root in 0..n {
            if index[root] != usize::MAX {
                continue;
            }
            // Each frame: (node, position of the next child to visit).
            let mut frames: VecDeque<(usize, usize)> = VecDeque::new();
            frames.push_back((root, 0));
            index[root] = next_index;
            low[root] = next_index;
            next_index += 1;
            stack.push(root);
            on_stack[root] = true;
            while let Some(&mut (node, ref mut cursor)) = frames.back_mut() {
                if let Some(&child) = self.children[node].get(*cursor) {
                    *cursor += 1;
                    if index[child] == usize::MAX {
                        index[child] = next_index;
                        low[child] = next_index;
                        next_index += 1;
                        stack.push(child);
                        on_stack[child] = true;
                        frames.push_back((child, 0));
                    } else if on_stack[child] {
                        low[node] = low[node].min(index[child]);
                    }
                    continue;
                }
                frames.pop_back();
                if let Some(&(parent, _)) = frames.back() {
                    low[parent] = low[parent].min(low[node]);
                }
                if low[node] == index[node] {
                    let mut component = Vec::new();
                    while let Some(member) = stack.pop() {
                        on_stack[member] = false;
                        component.push(member);
                        if member == node {
                            break;
                        }
                    }
                    component.sort_unstable();
                    components.push(component);
                }
            }
        }
        components
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diamond() -> Dag {
        // 0 -> 1, 0 -> 2, 1 -> 3, 2 -> 3
        Dag::new(4, [(0, 1), (0, 2), (1, 3), (2, 3)])
    }

    #[test]
    fn a_dag_over_keys_matches_one_over_positions_and_ignores_unknown_keys() {
        let keys = ["fetch", "left", "right", "merge"];
        let dag = Dag::from_keys(
            &keys,
            [
                ("fetch", "left"),
                ("fetch", "right"),
                ("left", "merge"),
                ("right", "merge"),
                ("ghost", "merge"),
            ],
        );
        assert_eq!(dag.levels(), diamond().levels());
        assert_eq!(dag.roots(), vec![0]);
    }

    #[test]
    fn diamond_order_levels_roots_leaves() {
        let dag = diamond();
        assert_eq!(dag.topological_order(), Some(vec![0, 1, 2, 3]));
        assert_eq!(dag.levels(), Some(vec![0, 1, 1, 2]));
        assert_eq!(
            dag.nodes_by_level(),
            Some(vec![vec![0], vec![1, 2], vec![3]])
        );
        assert_eq!(dag.roots(), vec![0]);
        assert_eq!(dag.leaves(), vec![3]);
        assert!(dag.cycles().is_empty());
    }

    #[test]
    fn level_is_the_longest_path_from_a_root() {
        // 0 -> 1 -> 2 -> 3 and a shortcut 0 -> 3: node 3 is at level 3, not 1.
        let dag = Dag::new(4, [(0, 1), (1, 2), (2, 3), (0, 3)]);
        assert_eq!(dag.levels(), Some(vec![0, 1, 2, 3]));
    }

    #[test]
    fn order_respects_edges_declared_backwards() {
        // Node 0 depends on node 2.
        let dag = Dag::new(3, [(2, 0), (1, 0)]);
        assert_eq!(dag.topological_order(), Some(vec![1, 2, 0]));
        assert_eq!(dag.roots(), vec![1, 2]);
        assert_eq!(dag.leaves(), vec![0]);
    }

    #[test]
    fn cycles_are_found_and_named_in_edge_order() {
        // 0 -> 1 -> 2 -> 0 and an independent 3 -> 4 -> 3; 5 hangs off the first cycle.
        let dag = Dag::new(6, [(0, 1), (1, 2), (2, 0), (3, 4), (4, 3), (2, 5)]);
        assert_eq!(dag.topological_order(), None);
        assert_eq!(dag.levels(), None);
        assert_eq!(dag.cycles(), vec![vec![0, 1, 2, 0], vec![3, 4, 3]]);
    }

    #[test]
    fn a_self_loop_is_a_cycle() {
        let dag = Dag::new(2, [(1, 1)]);
        assert_eq!(dag.cycles(), vec![vec![1, 1]]);
    }

    #[test]
    fn a_long_chain_does_not_overflow_the_stack() {
        let n = 200_000;
        let dag = Dag::new(n, (1..n).map(|i| (i - 1, i)));
        let levels = dag.levels().unwrap();
        assert_eq!(levels[n - 1], n - 1);
        let mut looped = (1..n).map(|i| (i - 1, i)).collect::<Vec<_>>();
        looped.push((n - 1, 0));
        let cycles = Dag::new(n, looped).cycles();
        assert_eq!(cycles.len(), 1);
        assert_eq!(cycles[0].len(), n + 1);
    }

    #[test]
    fn the_longest_path_follows_the_heaviest_branch() {
        let dag = diamond();
        let (path, total) = dag.longest_path(&[1.0, 5.0, 2.0, 1.0]).unwrap();
        assert_eq!(path, vec![0, 1, 3]);
        assert_eq!(total, 7.0);
        let (path, total) = dag.longest_path(&[1.0, 1.0, 9.0, 1.0]).unwrap();
        assert_eq!((path, total), (vec![0, 2, 3], 11.0));
        // Two disconnected chains: the heavier one wins.
        let dag = Dag::new(4, [(0, 1), (2, 3)]);
        assert_eq!(
            dag.longest_path(&[1.0, 1.0, 3.0, 0.0]).unwrap(),
            (vec![2, 3], 3.0)
        );
        assert!(
            Dag::new(2, [(0, 1), (1, 0)])
                .longest_path(&[1.0, 1.0])
                .is_none()
        );
    }

    #[test]
    fn descendants_are_counted_once_each() {
        assert_eq!(diamond().descendant_counts(), vec![3, 1, 1, 0]);
        let n = 2_000;
        let chain = Dag::new(n, (1..n).map(|i| (i - 1, i)));
        assert_eq!(chain.descendant_counts()[0], n - 1);
    }

    #[test]
    fn descendants_include_the_start_and_everything_downstream() {
        assert_eq!(diamond().descendants(0), vec![0, 1, 2, 3]);
        assert_eq!(diamond().descendants(1), vec![1, 3]);
        assert_eq!(diamond().descendants(3), vec![3]);
        assert!(diamond().descendants(9).is_empty());
    }

    #[test]
    fn out_of_range_and_duplicate_edges_are_ignored() {
        let dag = Dag::new(2, [(0, 1), (0, 1), (0, 7)]);
        assert_eq!(dag.children(0), &[1]);
        assert_eq!(dag.parents(1), &[0]);
    }
}
