//! Dependency graphs of jobs: a topological order (parents first), or the cycle that prevents
//! one. Iterative, so a chain of any length fits on the stack.

use std::collections::BTreeMap;

/// `edges[node]` lists the node's parents. Returns every node, parents before children, ties
/// in key order; or `Err(cycle)` as a path `[a, b, …, a]` (each depends on the next).
/// Parents that are not keys are ignored (the caller checks them).
pub fn topo_order<K: Ord + Clone>(edges: &BTreeMap<K, Vec<K>>) -> Result<Vec<K>, Vec<K>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark: BTreeMap<&K, Mark> = edges.keys().map(|k| (k, Mark::New)).collect();
    let mut order = Vec::with_capacity(edges.len());
    for root in edges.keys() {
        if mark[root] != Mark::New {
            continue;
        }
        // Depth-first over parents with an explicit stack of (node, next parent index).
        let mut stack: Vec<(&K, usize)> = vec![(root, 0)];
        mark.insert(root, Mark::Open);
        while let Some((node, i)) = stack.pop() {
            let parents = &edges[node];
            match parents.get(i) {
                None => {
                    mark.insert(node, Mark::Done);
                    order.push(node.clone());
                }
                Some(p) => {
                    stack.push((node, i + 1));
                    match mark.get(p) {
                        None | Some(Mark::Done) => {}
                        Some(Mark::New) => {
                            mark.insert(p, Mark::Open);
                            stack.push((p, 0));
                        }
                        Some(Mark::Open) => {
                            // `p` is on the stack: the path from it to `node`, then `p`, is a cycle.
                            let start = stack.iter().position(|(n, _)| *n == p).expect("open nodes are on the stack");
                            let mut cycle: Vec<K> = stack[start..].iter().map(|(n, _)| (*n).clone()).collect();
                            cycle.push(p.clone());
                            return Err(cycle);
                        }
                    }
                }
            }
        }
    }
    Ok(order)
}

/// One cycle of the graph, if it has any (see [`topo_order`]).
pub fn find_cycle<K: Ord + Clone>(edges: &BTreeMap<K, Vec<K>>) -> Option<Vec<K>> {
    topo_order(edges).err()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(e: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        e.iter().map(|(k, ps)| (k.to_string(), ps.iter().map(|p| p.to_string()).collect())).collect()
    }

    #[test]
    fn diamond_orders_parents_first() {
        let g = graph(&[("d", &["b", "c"]), ("b", &["a"]), ("c", &["a"]), ("a", &[])]);
        let order = topo_order(&g).unwrap();
        let pos = |k: &str| order.iter().position(|x| x == k).unwrap();
        assert!(pos("a") < pos("b") && pos("a") < pos("c") && pos("b") < pos("d") && pos("c") < pos("d"));
        assert_eq!(order.len(), 4);
    }

    #[test]
    fn a_cycle_is_named() {
        let g = graph(&[("a", &["c"]), ("b", &["a"]), ("c", &["b"]), ("x", &[])]);
        let cycle = find_cycle(&g).unwrap();
        assert_eq!(cycle.first(), cycle.last());
        assert_eq!(cycle.len(), 4, "{cycle:?}");
        for w in cycle.windows(2) {
            assert!(g[&w[0]].contains(&w[1]), "{} depends on {}", w[0], w[1]);
        }
        assert_eq!(find_cycle(&graph(&[("a", &["a"])])), Some(vec!["a".to_string(), "a".to_string()]));
    }

    #[test]
    fn a_long_chain_does_not_overflow() {
        let g: BTreeMap<u32, Vec<u32>> =
            (0..100_000u32).map(|i| (i, if i == 0 { vec![] } else { vec![i - 1] })).collect();
        let order = topo_order(&g).unwrap();
        assert_eq!(order, (0..100_000).collect::<Vec<_>>());
        let mut looped = g.clone();
        looped.insert(0, vec![99_999]);
        assert_eq!(find_cycle(&looped).map(|c| c.len()), Some(100_001));
    }
}
