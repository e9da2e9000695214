//! ClusterNetworkPolicy edits, incremental == recompute: random event
//! sequences where most events edit one of a few policies that select the
//! same pods, so that the profiles holding it are patched from the policies'
//! shares (`shares`) rather than rebuilt, and a recompute (every share and
//! profile built again from the objects) must find nothing to change.
use super::{
    explain::{node, random_cnp},
    random::{NAMESPACES, Rng, random_namespace, random_pod},
    *,
};

#[test]
fn profiles_patched_after_random_cluster_policy_edits_equal_a_full_recompute() {
    let mut rng = Rng(0x5eed_c9c0_0000_0003);
    let mut c = Compiler::new(Locality::Node("n1".into()));
    for ns in NAMESPACES {
        c.upsert_namespace(&random_namespace(&mut rng, ns));
    }
    for i in 0..10 {
        let ns = *rng.pick(&NAMESPACES);
        c.upsert_pod(&random_pod(&mut rng, ns, i));
    }
    let (mut checks, mut profile_changes) = (0, 0);
    for step in 0..600 {
        let ch = match rng.below(16) {
            0 => {
                let ns = *rng.pick(&NAMESPACES);
                c.upsert_namespace(&random_namespace(&mut rng, ns))
            }
            1 | 2 => {
                // Pod names are unique across namespaces: delete first.
                let (ns, i) = (*rng.pick(&NAMESPACES), rng.below(10));
                for n in NAMESPACES {
                    c.delete_pod(n, &format!("p{i}"));
                }
                c.upsert_pod(&random_pod(&mut rng, ns, i))
            }
            3 => c.delete_cluster_policy(&format!("cnp{}", rng.below(6))),
            4 => c.upsert_node(&node(
                rng.pick(&["a", "b"]),
                rng.pick(&["10.0.0.3", "10.0.1.200"]),
            )),
            _ => {
                let name = format!("cnp{}", rng.below(6));
                c.upsert_cluster_policy(&random_cnp(&mut rng, &name))
            }
        };
        profile_changes += usize::from(!ch.profiles.is_empty());
        // Chains of incremental events between the checks: a share or a
        // profile left stale by one event shows in a later one's output.
        if step % 4 == 3 {
            let re = c.recompute_all();
            assert!(
                re.endpoints.is_empty() && re.profiles.is_empty() && re.classes.is_empty(),
                "step {step}: {re:?}"
            );
            checks += 1;
        }
    }
    let patched = c.profiles.shares.patched;
    assert!(
        checks >= 150 && profile_changes > 100,
        "{checks} {profile_changes}"
    );
    assert!(patched > 100, "the sequence patched {patched} profiles");
}
