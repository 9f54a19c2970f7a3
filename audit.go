// The staleness audit: how many cached entries differ from their source
// right now.

package cacheaside

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
)

// AuditReport is what Audit found.
type AuditReport struct {
	Sampled     int           // entries checked against the source: values and "not found" tombstones a Get would serve as fresh
	Stale       int           // of them, entries whose answer differs from the source's now
	Skipped     int           // keys under the prefix with nothing to check: leases, entries inside a stale window (stale by policy), of an older namespace generation or another codec, undecodable, or replaced while audited
	OldestStale time.Duration // how long ago the oldest stale entry was loaded (from its soft expiry, so within the policy's jitter); 0 with none
	StaleKeys   []string      // the stale entries' keys, oldest first, at most maxAuditKeys
}

// maxAuditKeys bounds AuditReport.StaleKeys.
const maxAuditKeys = 100

// Audit measures how stale the cache is. It samples up to n entries under
// prefix (a SCAN on every node, as InvalidatePrefix walks them: any
// topology), reloads each from load, which maps a key back to its source
// (ErrNotFound, or an error Options.IsNotFound accepts, for "does not
// exist"), and counts the entries whose cached answer differs from the
// source's: a value that is not equal to the one loaded now (the codec's
// encodings differ and reflect.DeepEqual says so too), a value whose
// source is gone, or a "not found" for something that exists. An entry
// that changed in Redis while its source was read (an invalidation, a
// fill) is skipped, not counted. Entries are checked one at a time, so the
// audit adds at most one source read at a time to the database.
//
// An empty prefix, n below 1 or a nil load is refused (ErrInvalidOptions).
// An error from load (other than "not found") stops the audit: the report
// so far is returned with it, as with a Redis error or ctx ending. The
// walk visits as many keys as it takes to find n under prefix, the whole
// keyspace when few are there; bound it with ctx.
func (c *Cache[T]) Audit(ctx context.Context, prefix string, n int, load func(ctx context.Context, key string) (T, error)) (rep AuditReport, _ error) {
	switch {
	case prefix == "":
		return rep, fmt.Errorf("%w: Audit with an empty prefix", ErrInvalidOptions)
	case n < 1:
		return rep, fmt.Errorf("%w: Audit of %d entries", ErrInvalidOptions, n)
	case load == nil:
		return rep, fmt.Errorf("%w: Audit with a nil load", ErrInvalidOptions)
	}
	if c.closed.Load() {
		return rep, ErrClosed
	}
	keys, err := c.sampleKeys(ctx, prefix, n)
	if err != nil {
		return rep, c.redisError(ctx, "audit", prefix, err)
	}
	type stale struct {
		key string
		age time.Duration
	}
	var found []stale
	defer func() {
		slices.SortFunc(found, func(a, b stale) int { return int(b.age - a.age) })
		for i, s := range found {
			if i == 0 {
				rep.OldestStale = s.age
			}
			if i < maxAuditKeys {
				rep.StaleKeys = append(rep.StaleKeys, s.key)
			}
		}
		rep.Stale = len(found)
	}()
	for _, key := range keys {
		vk, kerr := c.checkKey(key)
		if kerr != nil {
			rep.Skipped++ // not a key of this cache's shape (a generation key, another cache's)
			continue
		}
		b, gv, err := c.read(ctx, key, vk)
		if err != nil {
			return rep, c.redisError(ctx, "audit", key, err)
		}
		now := c.opts.Clock()
		vw := c.classify(ctx, key, b, gv, now)
		if vw.state != stFresh && vw.state != stNotFound {
			rep.Skipped++
			continue
		}
		v, err := callFn(ctx, callLimits{timeout: c.opts.LoadTimeout}, func(ctx context.Context) (T, error) { return load(ctx, key) })
		gone := c.isNotFound(err)
		if err != nil && !gone {
			return rep, fmt.Errorf("cacheaside: Audit: loading %q: %w", key, err)
		}
		// Still the same entry? An invalidation or a fill while the source
		// was read makes the comparison meaningless.
		b2, gv2, err := c.read(ctx, key, vk)
		if err != nil {
			return rep, c.redisError(ctx, "audit", key, err)
		}
		if !sameEntry(b, b2) || gv2.gen != gv.gen {
			rep.Skipped++
			continue
		}
		rep.Sampled++
		cachedGone := vw.state == stNotFound
		if cachedGone == gone && (gone || c.equal(vw.v, v)) {
			continue
		}
		ttl := c.opts.Policy.TTL
		if cachedGone {
			ttl = c.opts.Policy.NegativeTTL
		}
		age := now.Sub(time.UnixMilli(vw.e.SoftExpiry).Add(-ttl))
		found = append(found, stale{key, max(age, 0)})
	}
	return rep, nil
}

// sampleKeys returns up to n keys under prefix, gathered by SCAN from
// every node (namespace generation keys left out).
func (c *Cache[T]) sampleKeys(ctx context.Context, prefix string, n int) ([]string, error) {
	pattern := wire.EscapeGlob(prefix) + "*"
	var mu sync.Mutex
	var keys []string
	full := errors.New("enough keys")
	err := c.eachNode(ctx, func(ctx context.Context, node scanner) error {
		var cursor uint64
		for {
			got, next, err := node.Scan(ctx, cursor, pattern, scanBatch).Result()
			if err != nil {
				return err
			}
			mu.Lock()
			for _, k := range got {
				if len(keys) < n && !strings.HasSuffix(k, wire.GenerationSuffix) {
					keys = append(keys, k)
				}
			}
			done := len(keys) >= n
			mu.Unlock()
			if done {
				return full
			}
			if cursor = next; cursor == 0 {
				return nil
			}
		}
	})
	if errors.Is(err, full) {
		err = nil
	}
	return keys, err
}

// sameEntry reports whether two reads of a key found the same entry (the
// same token; both absent counts as the same).
func sameEntry(a, b []byte) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	var ea, eb envelope.Entry
	if envelope.Decode(a, &ea) != nil || envelope.Decode(b, &eb) != nil {
		return false
	}
	return ea.Token == eb.Token
}

// equal reports whether a cached value and a freshly loaded one are the
// same: their encodings by the cache's codec match, or reflect.DeepEqual
// says so (a codec may encode equal maps in different orders).
func (c *Cache[T]) equal(a, b T) bool {
	ea, err1 := c.opts.Codec.Marshal(a)
	eb, err2 := c.opts.Codec.Marshal(b)
	if err1 == nil && err2 == nil && bytes.Equal(ea, eb) {
		return true
	}
	return reflect.DeepEqual(a, b)
}
