// Live cache names: two Caches on one client must not share a Name while
// their values differ in type or codec.

package cacheaside

import (
	"fmt"
	"reflect"
	"sync"
)

// liveNames is, with the subscription hubs (sub.go), the package's mutable
// state. A Name picks the pub/sub channels a cache listens on (wake-ups,
// the local tier's bus) and labels its metrics, and the mistake it guards against, two caches of one
// process given the same Name for different data, can only be seen from
// the process: such caches decode each other's wake-up messages, and where
// their keys meet, they read each other's entries as corrupt and overwrite
// them, silently. It holds live caches only (Close removes them), keyed by
// client, so tests that give each cache its own client (cachetest.Redis)
// never meet.
var liveNames = struct {
	mu sync.Mutex // protects m
	m  map[nameKey]*nameUse
}{m: make(map[nameKey]*nameUse)}

type nameKey struct {
	client Redis // as given to New; only comparable clients are tracked
	name   string
}

// nameUse is what the live caches of one nameKey hold.
type nameUse struct {
	typ    reflect.Type // T
	format byte         // Codec.Format()
	codec  string       // the codec's type, for the error
	n      int          // live caches
}

// claimName records a new Cache[T] of name on rdb and returns the function
// that forgets it. It refuses, with an error wrapping ErrInvalidOptions,
// when a live cache on the same client has the same name with another
// value type or codec format. Caches alike (same T and codec) may share a
// name: they read and write the same entries the same way.
func claimName[T any](rdb Redis, name string, codec Codec[T]) (release func(), err error) {
	// A value, not just its type: a wrapper struct whose interface field
	// holds a map has a comparable type but would panic as a map key.
	if !reflect.ValueOf(rdb).Comparable() {
		return func() {}, nil
	}
	k := nameKey{rdb, name}
	use := nameUse{typ: reflect.TypeFor[T](), format: codec.Format(), codec: fmt.Sprintf("%T", codec), n: 1}
	liveNames.mu.Lock()
	defer liveNames.mu.Unlock()
	if cur := liveNames.m[k]; cur != nil {
		if cur.typ != use.typ || cur.format != use.format {
			return nil, fmt.Errorf("%w: Name %q is already used on this client by a live Cache[%v] with codec %s (format %d), and this is a Cache[%v] with codec %s (format %d): caches with one Name share their pub/sub channels and overwrite each other's entries as corrupt where their keys meet; give each cache its own Options.Name",
				ErrInvalidOptions, name, cur.typ, cur.codec, cur.format, use.typ, use.codec, use.format)
		}
		cur.n++
	} else {
		liveNames.m[k] = &use
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			liveNames.mu.Lock()
			defer liveNames.mu.Unlock()
			if cur := liveNames.m[k]; cur != nil {
				if cur.n--; cur.n == 0 {
					delete(liveNames.m, k)
				}
			}
		})
	}, nil
}
