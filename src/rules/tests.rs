//! The rules table: one case per rule, over a small view kept here (objects by id, names
//! found by scanning), so a view bug elsewhere cannot hide a rule bug.

use std::collections::BTreeMap;

use super::*;
use crate::changelog::empty_hash;

#[derive(Clone)]
struct Obj {
    kind: Kind,
    version: Version,
    names: Vec<(ObjectId, Name)>,
    hash: ContentHash,
}

/// A tree: the root, folder `d` (1) holding file `f` (2), folder `e` (3) inside `d`, file `g`
/// (4) with two names (`g` and `d/g2`), symlink `s` (5), and empty folder `x` (6).
struct View(BTreeMap<ObjectId, Obj>);

fn id(n: u8) -> ObjectId {
    ObjectId([n; 16])
}

fn n(s: &str) -> Name {
    Name(s.as_bytes().to_vec())
}

const D: u8 = 1;
const F: u8 = 2;
const E: u8 = 3;
const G: u8 = 4;
const S: u8 = 5;
const X: u8 = 6;
const ABSENT: u8 = 9;

impl View {
    fn new() -> View {
        let mut m = BTreeMap::new();
        let mut put = |i: ObjectId, kind, names: Vec<(ObjectId, Name)>| {
            let hash = *blake3::hash(&i.0).as_bytes();
            m.insert(
                i,
                Obj {
                    kind,
                    version: 3,
                    names,
                    hash,
                },
            );
        };
        let root = ObjectId::ROOT;
        put(root, Kind::Directory, Vec::new());
        put(id(D), Kind::Directory, vec![(root, n("d"))]);
        put(id(F), Kind::File, vec![(id(D), n("f"))]);
        put(id(E), Kind::Directory, vec![(id(D), n("e"))]);
        put(id(G), Kind::File, vec![(root, n("g")), (id(D), n("g2"))]);
        put(id(S), Kind::Symlink, vec![(root, n("s"))]);
        put(id(X), Kind::Directory, vec![(root, n("x"))]);
        View(m)
    }
}

impl TreeView for View {
    fn object(&self, i: ObjectId) -> Option<Facts> {
        self.0.get(&i).map(|o| Facts {
            kind: o.kind,
            version: o.version,
            parent: o.names.first().map_or(ObjectId::ROOT, |(p, _)| *p),
            names: o.names.len(),
        })
    }
    fn child(&self, parent: ObjectId, name: &Name) -> Option<ObjectId> {
        self.0
            .iter()
            .find(|(_, o)| o.names.iter().any(|(p, m)| *p == parent && m == name))
            .map(|(i, _)| *i)
    }
    fn has_children(&self, dir: ObjectId) -> bool {
        self.0
            .values()
            .any(|o| o.names.iter().any(|(p, _)| *p == dir))
    }
    fn names(&self, i: ObjectId) -> Vec<(ObjectId, Name)> {
        self.0.get(&i).map(|o| o.names.clone()).unwrap_or_default()
    }
    fn content_hash(&self, i: ObjectId) -> Option<ContentHash> {
        self.0.get(&i).map(|o| o.hash)
    }
}

fn op(object: ObjectId, kind: OpKind) -> Op {
    Op {
        object,
        base_version: 3,
        new_version: 4,
        kind,
    }
}

fn create(object: ObjectId, parent: ObjectId, name: &str) -> Op {
    Op {
        base_version: 0,
        new_version: 1,
        ..op(
            object,
            OpKind::Create {
                parent,
                name: n(name),
                kind: ObjectKind::File,
                mode: 0o644,
                mtime_ns: 7,
            },
        )
    }
}

fn rename(object: ObjectId, new_parent: ObjectId, new_name: &str) -> Op {
    op(
        object,
        OpKind::Rename {
            new_parent,
            new_name: n(new_name),
        },
    )
}

fn link(object: ObjectId, parent: ObjectId, name: &str) -> Op {
    op(
        object,
        OpKind::Link {
            parent,
            name: n(name),
        },
    )
}

fn unlink(object: ObjectId, parent: ObjectId, name: &str) -> Op {
    op(
        object,
        OpKind::Unlink {
            parent,
            name: n(name),
        },
    )
}

fn write(object: ObjectId, base_hash: ContentHash) -> Op {
    op(
        object,
        OpKind::Write {
            base_hash,
            new_hash: *blake3::hash(b"x").as_bytes(),
            new_size: 1,
            delta: Delta::Whole(b"x".to_vec()),
        },
    )
}

fn truncate(object: ObjectId) -> Op {
    op(
        object,
        OpKind::Truncate {
            new_size: 0,
            new_hash: empty_hash(),
        },
    )
}

fn refused(o: &Op) -> RuleError {
    check_all(o, &View::new()).expect_err("the rules refuse this op")
}

#[test]
fn every_rule_refuses_its_case() {
    let root = ObjectId::ROOT;
    let v = View::new();
    let hash_of = |i: u8| v.content_hash(id(i)).unwrap();
    let table: Vec<(&str, Op, RuleError)> = vec![
        (
            "stale base",
            Op {
                base_version: 2,
                new_version: 3,
                ..truncate(id(F))
            },
            RuleError::StaleBase {
                object: id(F),
                base: 2,
                current: 3,
            },
        ),
        (
            "stale base of a create over an existing object",
            create(id(F), root, "new"),
            RuleError::StaleBase {
                object: id(F),
                base: 0,
                current: 3,
            },
        ),
        (
            "create of the root",
            Op {
                base_version: 0,
                new_version: 1,
                ..create(root, root, "r")
            },
            RuleError::StaleBase {
                object: root,
                base: 0,
                current: 3,
            },
        ),
        (
            "create in a missing parent",
            create(id(20), id(ABSENT), "a"),
            RuleError::BadParent {
                parent: id(ABSENT),
                found: None,
            },
        ),
        (
            "create in a file",
            create(id(20), id(F), "a"),
            RuleError::BadParent {
                parent: id(F),
                found: Some(Kind::File),
            },
        ),
        (
            "create on a taken name",
            create(id(20), id(D), "f"),
            RuleError::NameTaken {
                parent: id(D),
                name: n("f"),
            },
        ),
        (
            "create on a hard link's second name",
            create(id(20), id(D), "g2"),
            RuleError::NameTaken {
                parent: id(D),
                name: n("g2"),
            },
        ),
        (
            "write of a missing object",
            Op {
                base_version: 0,
                new_version: 1,
                ..write(id(ABSENT), empty_hash())
            },
            RuleError::Missing(id(ABSENT)),
        ),
        (
            "write to a folder",
            write(id(D), hash_of(D)),
            RuleError::NotAFile {
                object: id(D),
                kind: Kind::Directory,
                op: ContentOp::Write,
            },
        ),
        (
            "write on another base",
            write(id(F), empty_hash()),
            RuleError::BaseHash(id(F)),
        ),
        (
            "truncate of a symlink",
            truncate(id(S)),
            RuleError::NotAFile {
                object: id(S),
                kind: Kind::Symlink,
                op: ContentOp::Truncate,
            },
        ),
        (
            "rename of the root",
            rename(root, id(D), "r"),
            RuleError::Root {
                action: "be renamed",
            },
        ),
        (
            "rename of a file with two names",
            rename(id(G), root, "h"),
            RuleError::SeveralNames(id(G)),
        ),
        (
            "rename into a symlink",
            rename(id(F), id(S), "f"),
            RuleError::BadParent {
                parent: id(S),
                found: Some(Kind::Symlink),
            },
        ),
        (
            "rename onto a taken name",
            rename(id(F), root, "x"),
            RuleError::NameTaken {
                parent: root,
                name: n("x"),
            },
        ),
        (
            "move of a folder into itself",
            rename(id(D), id(D), "d"),
            RuleError::Cycle(id(D)),
        ),
        (
            "move of a folder below itself",
            rename(id(D), id(E), "d"),
            RuleError::Cycle(id(D)),
        ),
        (
            "delete of the root",
            op(root, OpKind::Delete),
            RuleError::Root {
                action: "be deleted",
            },
        ),
        (
            "delete of a folder holding a file",
            op(id(D), OpKind::Delete),
            RuleError::NotEmpty(id(D)),
        ),
        (
            "setattr of a missing object",
            Op {
                base_version: 0,
                new_version: 1,
                ..op(
                    id(ABSENT),
                    OpKind::SetAttr {
                        mode: Some(0o600),
                        mtime_ns: None,
                    },
                )
            },
            RuleError::Missing(id(ABSENT)),
        ),
        (
            "a second name for a folder",
            link(id(X), id(D), "x2"),
            RuleError::FolderLink(id(X)),
        ),
        (
            "a second name for the root",
            link(root, id(D), "r"),
            RuleError::Root {
                action: "have another name",
            },
        ),
        (
            "a link onto a taken name",
            link(id(F), root, "s"),
            RuleError::NameTaken {
                parent: root,
                name: n("s"),
            },
        ),
        (
            "a link into a missing folder",
            link(id(F), id(ABSENT), "f"),
            RuleError::BadParent {
                parent: id(ABSENT),
                found: None,
            },
        ),
        (
            "unlink of a name the object does not have",
            unlink(id(G), id(D), "g"),
            RuleError::NoSuchName {
                object: id(G),
                parent: id(D),
                name: n("g"),
            },
        ),
        (
            "unlink of another object's name",
            unlink(id(F), root, "g"),
            RuleError::NoSuchName {
                object: id(F),
                parent: root,
                name: n("g"),
            },
        ),
        (
            "unlink of the last name",
            unlink(id(F), id(D), "f"),
            RuleError::LastName(id(F)),
        ),
    ];
    for (what, o, want) in table {
        assert_eq!(check_all(&o, &v), Err(want), "{what}");
    }
}

#[test]
fn the_root_is_refused_before_anything_else() {
    let root = ObjectId::ROOT;
    let mut v = View::new();
    v.0.get_mut(&root).unwrap().version = 0;
    let mut c = create(root, root, "r");
    c.base_version = 0;
    assert_eq!(
        check_all(&c, &v),
        Err(RuleError::Root {
            action: "be created"
        })
    );
    assert_eq!(
        check(&unlink(root, root, "r"), &v),
        Err(RuleError::Root {
            action: "lose its name"
        })
    );
}

#[test]
fn a_broken_folder_chain_is_refused() {
    let mut v = View::new();
    // Folder e's parent d is gone without e: the tree is broken above e.
    v.0.remove(&id(D));
    assert_eq!(
        check(&rename(id(X), id(E), "x"), &v),
        Err(RuleError::BrokenPath {
            object: id(X),
            missing: id(D),
        })
    );
    // A loop in the chain that does not pass through the moved folder.
    let mut v = View::new();
    v.0.get_mut(&id(D)).unwrap().names = vec![(id(E), n("d"))];
    assert_eq!(
        check(&rename(id(X), id(E), "x"), &v),
        Err(RuleError::TooDeep(id(X)))
    );
}

#[test]
fn accepted_ops_say_what_they_change() {
    let root = ObjectId::ROOT;
    let v = View::new();
    let c = create(id(20), id(D), "new");
    assert!(matches!(
        check_all(&c, &v),
        Ok(Effect::Create(NewObject { parent, name, mode: 0o644, mtime_ns: 7, .. }))
            if parent == id(D) && *name == n("new")
    ));
    // A rename to the name it has is no clash.
    let same = rename(id(F), id(D), "f");
    let Ok(Effect::Names(change)) = check_all(&same, &v) else {
        panic!("a rename to its own name applies")
    };
    assert_eq!(change.removed().count() + change.added().count(), 0);
    // A file moves out of its folder; an empty folder is deleted.
    let Ok(Effect::Names(change)) = check_all(&rename(id(F), root, "f"), &v) else {
        panic!("a move applies")
    };
    assert_eq!(change.removed().collect::<Vec<_>>(), [&(id(D), n("f"))]);
    assert_eq!(change.added().collect::<Vec<_>>(), [&(root, n("f"))]);
    assert_eq!(
        check_all(&op(id(X), OpKind::Delete), &v),
        Ok(Effect::Delete)
    );
    assert_eq!(
        check_all(&op(id(G), OpKind::Delete), &v),
        Ok(Effect::Delete)
    );
    // A folder moves into a sibling folder.
    assert!(check_all(&rename(id(E), id(X), "e"), &v).is_ok());
    // Names stay sorted, the least first, whatever order they come in.
    let Ok(Effect::Names(change)) = check_all(&link(id(G), root, "a"), &v) else {
        panic!("a link applies")
    };
    let (first, others) = change.split().unwrap();
    assert_eq!(first, &(root, n("a")));
    assert_eq!(others, [(root, n("g")), (id(D), n("g2"))]);
    let Ok(Effect::Names(change)) = check_all(&unlink(id(G), root, "g"), &v) else {
        panic!("an unlink of one of two names applies")
    };
    assert_eq!(change.after, [(id(D), n("g2"))]);
    // Content, attributes, xattrs.
    let w = write(id(F), v.content_hash(id(F)).unwrap());
    let Ok(Effect::Content(cc)) = check_all(&w, &v) else {
        panic!("a write on the current content applies")
    };
    assert_eq!(cc.new_size(), 1);
    let mut mode = 0o600;
    let mut mtime = 1;
    let Ok(Effect::Attr(a)) = check_all(
        &op(
            root,
            OpKind::SetAttr {
                mode: None,
                mtime_ns: Some(9),
            },
        ),
        &v,
    ) else {
        panic!("a setattr on the root applies")
    };
    a.apply(&mut mode, &mut mtime);
    assert_eq!((mode, mtime), (0o600, 9));
    let mut xattrs = BTreeMap::new();
    for kind in [
        OpKind::SetXattr {
            name: b"user.a".to_vec(),
            value: b"1".to_vec(),
        },
        OpKind::SetXattr {
            name: b"user.b".to_vec(),
            value: b"2".to_vec(),
        },
        OpKind::RemoveXattr {
            name: b"user.a".to_vec(),
        },
    ] {
        let o = op(id(S), kind);
        let Ok(Effect::Xattr(x)) = check_all(&o, &v) else {
            panic!("xattrs apply to a symlink")
        };
        x.apply(&mut xattrs);
    }
    assert_eq!(
        xattrs,
        BTreeMap::from([(b"user.b".to_vec(), b"2".to_vec())])
    );
}

#[test]
fn refusals_name_their_object_and_keep_the_devices_words() {
    let e = refused(&create(id(20), id(D), "f"));
    assert_eq!(e.object(), None);
    assert!(
        e.to_string().starts_with("name f is taken in folder "),
        "{e}"
    );
    let e = refused(&Op {
        base_version: 1,
        new_version: 2,
        ..truncate(id(F))
    });
    assert_eq!(e.object(), Some(id(F)));
    assert!(
        e.to_string().contains("stale base version 1 (current 3)"),
        "{e}"
    );
    assert_eq!(refused(&unlink(id(F), id(D), "f")).object(), Some(id(F)));
}

#[test]
fn content_changes_build_the_bytes_they_describe() {
    let f = id(F);
    let w = write(f, *blake3::hash(b"old").as_bytes());
    let c = ContentChange::of(&w.kind).unwrap();
    assert_eq!(c.apply_to(f, b"old".to_vec(), 16).unwrap(), b"x");
    // Another base, a result over the limit.
    assert!(c.apply_to(f, b"other".to_vec(), 16).is_err());
    assert!(c.apply_to(f, b"old".to_vec(), 0).is_err());
    let t = OpKind::Truncate {
        new_size: 2,
        new_hash: *blake3::hash(b"ol").as_bytes(),
    };
    let c = ContentChange::of(&t).unwrap();
    assert_eq!(c.apply_to(f, b"old".to_vec(), 16).unwrap(), b"ol");
    let e = c.apply_to(f, b"new".to_vec(), 16).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("truncate of {f} does not give its hash")
    );
    assert_eq!(
        c.apply_to(f, b"old".to_vec(), 1).unwrap_err().to_string(),
        "size too large"
    );
    assert!(ContentChange::of(&OpKind::Delete).is_none());
}
