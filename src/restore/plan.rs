//! The restore plan: which task creates which, with which ids on every
//! pid-namespace level, and how sessions and process groups are rebuilt.
//!
//! Ids in [`TaskEntry`] come in two kinds: `pid`/`ppid` as the dumper saw
//! them, and `vpids`/`vsids`/`vpgids` per level from the root's namespace
//! down. The plan compares sessions and groups at the root's level
//! (`v*[0]`) and hands every task the values of its own level
//! (`v*.last()`), which is what its own `setsid`/`setpgid` see.

use crate::image::model::{TaskEntry, TaskState};
use pdump_parasite::restore::MAX_LEVELS;

/// One task to create.
#[derive(Clone, Debug)]
pub struct PlanTask {
    /// The dumped tree entry.
    pub entry: TaskEntry,
    /// Index of the parent in the plan (None for the root).
    pub parent: Option<usize>,
    /// Children, in creation order.
    pub children: Vec<usize>,
    /// Index of the process image (None for zombies).
    pub image: Option<usize>,
    /// Create with CLONE_NEWPID (the task is the init of a new namespace).
    pub newpid: bool,
    /// clone3's `set_tid`: the pid on every level, innermost first.
    pub set_tid: Vec<i32>,
    /// Call setsid() right after creation.
    pub setsid: bool,
    /// Make its own process group (setpgid(0, 0)) in the leaders' phase.
    pub pgid_leader: bool,
    /// Join this group (an id of the task's own level) in the members' phase.
    pub join_pgid: Option<i32>,
    /// Create a helper task with these ids (innermost first) that makes the
    /// group of a leader no longer in the tree, for its members to join,
    /// then exits and is reaped by this task.
    pub pgid_helper: Option<Vec<i32>>,
    /// Created by a helper with these ids (innermost first) that leads a
    /// session whose leader is gone, then exits and is reaped by the parent.
    pub session_helper: Option<Vec<i32>>,
    /// Exit status for a zombie (a wait status).
    pub zombie: Option<i32>,
    /// Stop the task when the tree resumes.
    pub stopped: bool,
}

/// The whole plan, in creation (DFS) order: index 0 is the root.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Tasks.
    pub tasks: Vec<PlanTask>,
}

/// Why a tree cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The inventory lists no tasks.
    #[error("the checkpoint lists no tasks")]
    Empty,
    /// A task's parent is not in the tree (only the root may have one outside).
    #[error("task {pid}: its parent {ppid} is not in the checkpoint")]
    Orphan {
        /// Task.
        pid: i32,
        /// Parent.
        ppid: i32,
    },
    /// A live task has no process image.
    #[error("task {pid}: no process image in the checkpoint")]
    NoImage {
        /// Task.
        pid: i32,
    },
    /// More nested pid namespaces than clone3 can name.
    #[error("task {pid}: {levels} pid-namespace levels (at most {MAX_LEVELS})")]
    TooDeep {
        /// Task.
        pid: i32,
        /// Levels.
        levels: usize,
    },
    /// A session whose leader is not in the checkpoint (and is not the root's).
    #[error("task {pid}: its session {sid} has no leader in the checkpoint and differs from its parent's (not supported)")]
    Session {
        /// Task.
        pid: i32,
        /// Session id (root level).
        sid: i32,
    },
    /// A process group whose leader is not in the checkpoint.
    #[error("task {pid}: process group {pgid} has no leader in the checkpoint and differs from its parent's (not supported)")]
    Group {
        /// Task.
        pid: i32,
        /// Group id (root level).
        pgid: i32,
    },
}

fn top(v: &[i32]) -> i32 {
    *v.first().unwrap_or(&0)
}

impl Plan {
    /// Plan the tree: `images` are the process images' pids (index = image
    /// index); `shell_job`: the root keeps the caller's session and group.
    pub fn new(tree: &[TaskEntry], images: &[i32], shell_job: bool) -> Result<Plan, PlanError> {
        if tree.is_empty() {
            return Err(PlanError::Empty);
        }
        let mut tasks: Vec<PlanTask> = Vec::with_capacity(tree.len());
        for (i, e) in tree.iter().enumerate() {
            let parent = if i == 0 {
                None
            } else {
                Some(
                    tree.iter()
                        .position(|p| p.pid == e.ppid)
                        .ok_or(PlanError::Orphan {
                            pid: e.pid,
                            ppid: e.ppid,
                        })?,
                )
            };
            let zombie = match e.state {
                TaskState::Zombie { exit_code } => Some(exit_code),
                _ => None,
            };
            let image = images.iter().position(|&p| p == e.pid);
            if zombie.is_none() && image.is_none() {
                return Err(PlanError::NoImage { pid: e.pid });
            }
            if e.vpids.len() > MAX_LEVELS || e.vpids.is_empty() {
                return Err(PlanError::TooDeep {
                    pid: e.pid,
                    levels: e.vpids.len(),
                });
            }
            let parent_depth = parent.map(|p| tree[p].depth);
            let newpid = e.pidns_init && (parent_depth.is_none() || parent_depth < Some(e.depth));
            // The root's own level may be a namespace we create: name only
            // the levels from the root's namespace down.
            let set_tid: Vec<i32> = e.vpids.iter().rev().copied().collect();
            tasks.push(PlanTask {
                entry: e.clone(),
                parent,
                children: Vec::new(),
                image,
                newpid,
                set_tid,
                setsid: false,
                pgid_leader: false,
                join_pgid: None,
                pgid_helper: None,
                session_helper: None,
                zombie,
                stopped: matches!(e.state, TaskState::Stopped),
            });
        }
        for i in 1..tasks.len() {
            let p = tasks[i].parent.expect("non-root has a parent");
            tasks[p].children.push(i);
        }
        let in_tree = |pid: i32| tree.iter().any(|t| top(&t.vpids) == pid);
        let root = &tree[0];
        let root_sid_outside = !in_tree(top(&root.vsids));
        let root_pgid_outside = !in_tree(top(&root.vpgids));
        // Session and group ids as they will be after restore (root level):
        // an id from outside the tree follows the root.
        let (mut sids, mut pgids) = (Vec::new(), Vec::new());
        for (i, e) in tree.iter().enumerate() {
            let pid = top(&e.vpids);
            let mut sid = top(&e.vsids);
            let mut pgid = top(&e.vpgids);
            if !shell_job && root_sid_outside && sid == top(&root.vsids) {
                sid = top(&root.vpids);
            }
            if !shell_job && root_pgid_outside && pgid == top(&root.vpgids) {
                pgid = top(&root.vpids);
            }
            if !shell_job && root_sid_outside && i == 0 {
                // A detached root leads a session (and a group) of its own.
                sid = pid;
                pgid = pid;
            }
            sids.push(sid);
            pgids.push(pgid);
        }
        let mut helped: Vec<i32> = Vec::new();
        for i in 0..tasks.len() {
            let e = &tree[i];
            let pid = top(&e.vpids);
            let (sid, pgid) = (sids[i], pgids[i]);
            let parent = tasks[i].parent;
            let inherited_sid = match parent {
                Some(p) => sids[p],
                None => -1,
            };
            tasks[i].setsid = sid == pid && inherited_sid != sid;
            if !tasks[i].setsid && parent.is_some() && sid != inherited_sid {
                // A session whose leader is gone: a helper with the
                // session's ids calls setsid and creates this task (with
                // CLONE_PARENT, so its parent stays the dumped one).
                if in_tree(sid) || e.vsids.len() != e.vpids.len() {
                    return Err(PlanError::Session { pid: e.pid, sid });
                }
                tasks[i].session_helper = Some(e.vsids.iter().rev().copied().collect());
            }
            let start_pgid = if tasks[i].setsid {
                pid
            } else if tasks[i].session_helper.is_some() {
                sid // born in the helper's group
            } else {
                match parent {
                    Some(p) => pgids[p],
                    None => pgid, // shell job: the caller's group
                }
            };
            if tasks[i].setsid && pgid == pid {
                continue;
            }
            if pgid == pid {
                tasks[i].pgid_leader = true;
                continue;
            }
            // Join the group of its leader (a member of the tree, alive or
            // zombie), by the id the leader has on this task's level: groups
            // are made after every task exists, so nothing is inherited. A
            // group from outside (the caller's, with --shell-job) is.
            let lvl = e.vpids.len() - 1;
            match tree
                .iter()
                .find(|t| top(&t.vpids) == pgid)
                .and_then(|t| t.vpids.get(lvl))
            {
                Some(&id) => tasks[i].join_pgid = Some(id),
                // The caller's group (--shell-job), or a leader in an outer
                // pid namespace: inherited from the parent at creation.
                None if pgid == start_pgid => {}
                // A group whose leader is gone: the first member in tree
                // order creates a helper with the group's ids that makes it.
                None if !in_tree(pgid) && e.vpgids.len() == e.vpids.len() => {
                    if !helped.contains(&pgid) {
                        helped.push(pgid);
                        tasks[i].pgid_helper = Some(e.vpgids.iter().rev().copied().collect());
                    }
                    tasks[i].join_pgid = Some(*e.vpgids.last().unwrap_or(&pgid));
                }
                None => return Err(PlanError::Group { pid: e.pid, pgid }),
            }
        }
        if !shell_job && root_sid_outside {
            tasks[0].setsid = true;
            tasks[0].pgid_leader = false;
        }
        Ok(Plan { tasks })
    }

    /// Indexes of tasks that are not zombies.
    pub fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.tasks.len()).filter(|&i| self.tasks[i].zombie.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pid: i32, ppid: i32, sid: i32, pgid: i32) -> TaskEntry {
        TaskEntry {
            pid,
            tgid: pid,
            ppid,
            pgid,
            sid,
            vpids: vec![pid],
            vtgids: vec![pid],
            vpgids: vec![pgid],
            vsids: vec![sid],
            ..TaskEntry::default()
        }
    }

    #[test]
    fn detached_root_leads_its_session_and_children_follow() {
        let tree = vec![
            entry(10, 1, 5, 5),
            entry(11, 10, 5, 5),
            entry(12, 10, 5, 12),
        ];
        let p = Plan::new(&tree, &[10, 11, 12], false).unwrap();
        assert!(p.tasks[0].setsid);
        assert!(!p.tasks[1].setsid && !p.tasks[1].pgid_leader);
        assert_eq!(p.tasks[1].join_pgid, Some(10));
        assert!(p.tasks[2].pgid_leader);
        assert_eq!(p.tasks[0].children, vec![1, 2]);
    }

    #[test]
    fn shell_job_keeps_the_callers_session() {
        let tree = vec![entry(10, 1, 5, 5), entry(11, 10, 5, 5)];
        let p = Plan::new(&tree, &[10, 11], true).unwrap();
        assert!(!p.tasks[0].setsid && !p.tasks[0].pgid_leader);
        assert!(!p.tasks[1].setsid && p.tasks[1].join_pgid.is_none());
    }

    #[test]
    fn groups_join_a_sibling_or_zombie_leader() {
        let mut z = entry(12, 10, 10, 12);
        z.state = TaskState::Zombie { exit_code: 4 << 8 };
        let tree = vec![entry(10, 1, 10, 10), entry(11, 10, 10, 12), z];
        let p = Plan::new(&tree, &[10, 11], false).unwrap();
        assert_eq!(p.tasks[1].join_pgid, Some(12));
        assert!(p.tasks[2].pgid_leader);
        assert_eq!(p.tasks[2].zombie, Some(4 << 8));
        assert_eq!(p.live().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn nested_namespace_set_tid_is_innermost_first() {
        let mut c = entry(20, 10, 10, 10);
        c.vpids = vec![20, 1];
        c.vsids = vec![10, 0];
        c.vpgids = vec![10, 0];
        c.depth = 1;
        c.pidns_init = true;
        let tree = vec![entry(10, 1, 10, 10), c];
        let p = Plan::new(&tree, &[10, 20], false).unwrap();
        assert!(p.tasks[1].newpid);
        assert_eq!(p.tasks[1].set_tid, vec![1, 20]);
    }

    #[test]
    fn a_session_whose_leader_is_gone_gets_a_helper() {
        let tree = vec![entry(10, 1, 10, 10), entry(11, 10, 77, 77)];
        let p = Plan::new(&tree, &[10, 11], false).unwrap();
        assert_eq!(p.tasks[1].session_helper, Some(vec![77]));
        assert!(!p.tasks[1].setsid && !p.tasks[1].pgid_leader);
        assert_eq!(
            (p.tasks[1].join_pgid, &p.tasks[1].pgid_helper),
            (None, &None)
        );
    }

    #[test]
    fn a_group_whose_leader_is_gone_gets_one_helper() {
        let tree = vec![
            entry(10, 1, 10, 10),
            entry(11, 10, 10, 77),
            entry(12, 10, 10, 77),
        ];
        let p = Plan::new(&tree, &[10, 11, 12], false).unwrap();
        assert_eq!(p.tasks[1].pgid_helper, Some(vec![77]));
        assert_eq!(p.tasks[2].pgid_helper, None);
        assert_eq!(p.tasks[1].join_pgid, Some(77));
        assert_eq!(p.tasks[2].join_pgid, Some(77));
    }
}
