// Keys: versioned keyspaces, escaping, namespaces.

package cacheaside

import (
	"fmt"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"strconv"
	"strings"
)

// Keyspace builds the keys of one kind of cached item. Every key it builds
// has the form
//
//	v<version>:<name>:<part>:<part>...
//
// for example v1:tasks:42 or v1:tasks:org:acme:status:done:page:2:size:20.
//
// The version is the key version: bump it when the shape of the cached value
// changes incompatibly, so old entries are simply never read again and die
// by their TTL. It is separate from the entry format version stored inside
// each value, which belongs to this library and only changes with it.
//
// Parts are escaped with [EscapePart], so a part can never add a separator
// or a glob character: an org named "acme:*" yields the key
// v1:tasks:org:acme%3A%2A, not a pattern that matches other orgs.
//
// The zero Keyspace is not valid; build one with [NewKeyspace].
type Keyspace struct {
	base string // "v1:tasks"
}

// maxKeyspaceName is the longest name NewKeyspace accepts.
const maxKeyspaceName = 64

// NewKeyspace returns a Keyspace for name at key version version (≥ 1).
// name must be 1 to 64 characters from a-z, 0-9, '_', '-' and '.'.
func NewKeyspace(name string, version int) (Keyspace, error) {
	if version < 1 {
		return Keyspace{}, fmt.Errorf("%w: keyspace %q: version %d, want ≥ 1", ErrInvalidKey, name, version)
	}
	if name == "" || len(name) > maxKeyspaceName {
		return Keyspace{}, fmt.Errorf("%w: keyspace name %q must be 1 to %d characters", ErrInvalidKey, name, maxKeyspaceName)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '_' || c == '-' || c == '.') {
			return Keyspace{}, fmt.Errorf("%w: keyspace name %q: character %q not in [a-z0-9_.-]", ErrInvalidKey, name, c)
		}
	}
	return Keyspace{base: "v" + strconv.Itoa(version) + ":" + name}, nil
}

// MustKeyspace is NewKeyspace for package-level variables; it panics on an
// invalid name or version.
func MustKeyspace(name string, version int) Keyspace {
	ks, err := NewKeyspace(name, version)
	if err != nil {
		panic(err)
	}
	return ks
}

// String returns the keyspace's own prefix without a trailing separator,
// such as "v1:tasks".
func (ks Keyspace) String() string { return ks.base }

// Key returns the key for parts, each escaped with EscapePart.
func (ks Keyspace) Key(parts ...string) string {
	return ks.build(parts, false)
}

// Prefix returns the key prefix shared by every key whose parts start with
// parts, ending in the separator: Prefix("org", "acme") is
// "v1:tasks:org:acme:", which matches the keys of org "acme" and not those
// of "acme2". Prefix() with no parts covers the whole keyspace.
func (ks Keyspace) Prefix(parts ...string) string {
	return ks.build(parts, true)
}

func (ks Keyspace) build(parts []string, trailing bool) string {
	if ks.base == "" {
		panic("cacheaside: zero Keyspace; build one with NewKeyspace")
	}
	n := len(ks.base) + len(parts) + 1
	for _, p := range parts {
		n += len(p) + 2*wire.EscapedExtra(p)
	}
	var b strings.Builder
	b.Grow(n)
	b.WriteString(ks.base)
	for _, p := range parts {
		b.WriteByte(':')
		wire.WriteEscaped(&b, p)
	}
	if trailing {
		b.WriteByte(':')
	}
	return b.String()
}

// Namespace is a group of keys that one call invalidates, whatever its
// size: for example every cached list page of one org. Build it from a
// Keyspace and use it with a Cache whose Options.Namespaced is set:
//
//	lists := cacheaside.MustKeyspace("task_lists", 1)
//	ns := lists.Namespace("org", "acme")     // v1:task_lists:{org:acme}
//	key := ns.Key("status", "done", "page", "2") // v1:task_lists:{org:acme}:status:done:page:2
//	page, err := listCache.Get(ctx, key, load)
//	err = listCache.InvalidateNamespace(ctx, ns) // every page of acme, one command
//
// The namespace's parts are the key's Redis Cluster hash tag, so all its
// keys and its generation key (v1:task_lists:{org:acme}:#gen) live in one
// slot and a Get reads the entry and the generation with one MGET.
type Namespace struct {
	tag string // "v1:task_lists:{org:acme}"
}

// Namespace returns the namespace for parts (at least one), escaped like
// key parts.
func (ks Keyspace) Namespace(parts ...string) Namespace {
	if len(parts) == 0 {
		panic("cacheaside: Namespace needs at least one part")
	}
	inner := ks.build(parts, false)[len(ks.base)+1:]
	return Namespace{tag: ks.base + ":{" + inner + "}"}
}

// Key returns the key for parts inside the namespace.
func (ns Namespace) Key(parts ...string) string {
	if ns.tag == "" {
		panic("cacheaside: zero Namespace; build one with Keyspace.Namespace")
	}
	return Keyspace{base: ns.tag}.build(parts, false)
}

// Prefix returns the prefix every key of the namespace starts with (its
// generation key too), for InvalidatePrefix: the tag itself, since no
// other namespace's tag can start with it (parts escape '}').
func (ns Namespace) Prefix() string { return ns.tag }

// String returns the namespace's tag, such as "v1:task_lists:{org:acme}".
func (ns Namespace) String() string { return ns.tag }

// genKey is where the namespace's current generation lives. Parts escape
// '#', so no entry key can equal it.
func (ns Namespace) genKey() string { return ns.tag + wire.GenerationSuffix }

// checkKey is the validation every entry point applies to a key.
func checkKey(key string, max int) error {
	if key == "" {
		return fmt.Errorf("%w: empty key", ErrInvalidKey)
	}
	if len(key) > max {
		return fmt.Errorf("%w: key of %d bytes exceeds MaxKeySize %d", ErrInvalidKey, len(key), max)
	}
	return nil
}
