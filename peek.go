// Reading and warming without a loader: Peek shows what is cached under a
// key; SetMany writes many values in pipelined rounds, leaving the keys
// that loads in flight hold to their fills.

package cacheaside

import (
	"context"
	"errors"
	"slices"
	"time"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// Peeked is what Peek found under a key.
type Peeked[T any] struct {
	// State is one of:
	//	"absent"      nothing (or an entry of an older namespace or tag generation)
	//	"loading"     a lease: a load is in flight, nothing to serve yet
	//	"not-found"   a cached "not found", inside its NegativeTTL
	//	"fresh"       a value inside its TTL
	//	"stale"       a value past its TTL, inside StaleWhileRevalidate (a Get serves it and refreshes it)
	//	"expired"     a value past its serving windows, kept for StaleIfError (a Get reloads it)
	//	"undecodable" bytes this cache cannot decode (a Get overwrites them)
	State string
	// Value is the value, for "fresh", "stale" and "expired".
	Value T
	// Refreshing reports that a reload of the value is in flight, under
	// its holder's refresh lease.
	Refreshing bool
	// Expires is when the value (or the "not found") stops or stopped
	// being fresh; zero for the other states.
	Expires time.Time
	// LoadTime is how long the load that stored it took; 0 for Set,
	// SetMany and the other states.
	LoadTime time.Duration
	// Written is when the value (or the "not found") was stored, by the
	// clock of the process that stored it (Options.Clock); a reload that
	// found the value unchanged keeps it. Zero for the other states.
	Written time.Time
	// Age is how long ago that was, by this cache's clock (never below
	// 0); zero for the other states.
	Age time.Duration
}

// setWritten sets Written and Age from an entry written at w (Unix ms).
func (p *Peeked[T]) setWritten(w int64, now time.Time) {
	if w > 0 {
		p.Written = time.UnixMilli(w)
		p.Age = max(now.Sub(p.Written), 0)
	}
}

// Peek reads what Redis holds under key, without loading, waiting or
// writing anything: one GET (an MGET with the namespace generation, or
// the tags' generations, in a namespaced or tagged cache). It does not read or fill the local tier and is not
// counted in Stats. Freshness is judged by Options.Clock, as a Get judges
// it. It returns ErrInvalidKey for an invalid key, ErrClosed after Close,
// and an *OpError when Redis fails; undecodable bytes are reported (as a
// Get reports them) and Peek says "undecodable".
func (c *Cache[T]) Peek(ctx context.Context, key string) (Peeked[T], error) {
	var p Peeked[T]
	vk, err := c.checkKey(key)
	if err != nil {
		return p, err
	}
	if c.closed.Load() {
		return p, ErrClosed
	}
	b, gv, err := c.readDirect(ctx, key, vk)
	if err != nil {
		if isWrongType(err) {
			p.State = "undecodable"
			return p, nil
		}
		return p, c.redisError(ctx, "peek", key, err)
	}
	now := c.opts.Clock()
	vw := c.classify(ctx, key, b, gv, now)
	switch vw.state {
	case stMiss:
		p.State = "absent"
		var e envelope.Entry
		if vw.replace != nil || b != nil && envelope.Decode(b, &e) != nil {
			p.State = "undecodable"
		}
	case stLease:
		p.State = "loading"
	case stNotFound:
		p.State = "not-found"
		p.Expires = time.UnixMilli(vw.e.SoftExpiry)
		p.setWritten(vw.e.Written, now)
	default:
		p = c.peeked(&vw, now) // the same judgement a reload's loader is shown
	}
	return p, nil
}

// maxWarmRound is the most keys one SetMany round sends in one pipeline.
const maxWarmRound = 256

// SetMany writes values (cache keys to values) in pipelined rounds of up
// to 256 keys, to warm the cache: each key's value is written, with the
// Policy's lifetime (Options.Lifetime sees a load time of 0), over what
// the key holds, unless a load is in flight for it (another Get's lease,
// in this process or another, or a live refresh lease), whose fill is left
// to land: that load read the source after SetMany's values were read, or
// at about the same time. It returns how many keys it wrote, and the
// local tiers drop their copies of those keys.
//
// Use SetMany for values read from the source of truth in bulk (at start,
// or after a restore); right after a write of your own, use Set, which
// overwrites a load in flight, or Invalidate. Like Set, a value read
// before a write whose invalidation returns before SetMany writes it is
// written anyway, and stays until its TTL or the next invalidation.
//
// Errors are joined, one *KeyError per key: an invalid key, a value the
// codec refuses or over MaxValueSize (the key is invalidated instead, as
// Set does), a Redis failure (the key's invalidation is queued for retry,
// as Set queues it, so no older value outlives the call). The other keys
// are written. ErrClosed after Close.
func (c *Cache[T]) SetMany(ctx context.Context, values map[string]T) (int, error) {
	if c.closed.Load() {
		return 0, ErrClosed
	}
	var errs []error
	keys := make([]string, 0, len(values))
	for k := range values {
		keys = append(keys, k)
	}
	slices.Sort(keys) // rounds in a stable order
	written := 0
	for len(keys) > 0 {
		n := min(len(keys), maxWarmRound)
		w, err := c.warmRound(ctx, keys[:n], values)
		written += w
		if err != nil {
			errs = append(errs, err)
		}
		keys = keys[n:]
	}
	return written, errors.Join(errs...)
}

// warmRound is one pipelined round of SetMany.
func (c *Cache[T]) warmRound(ctx context.Context, keys []string, values map[string]T) (int, error) {
	var (
		errs  []error
		sent  []string
		calls []scriptCall
		bad   []string // keys whose value could not be encoded: invalidated instead
	)
	vks := make([]verKeys, 0, len(keys))
	valid := make([]string, 0, len(keys))
	for _, k := range keys {
		vk, err := c.checkKey(k)
		if err != nil {
			errs = append(errs, &KeyError{Key: k, Err: err})
			continue
		}
		vks = append(vks, vk)
		valid = append(valid, k)
	}
	// In a tagged cache each entry carries its tags' generations, read (or
	// made) first in one pipeline; a key whose tags failed is not written.
	gvs, gerrs := make([]genView, len(vks)), make([]error, len(vks))
	if c.tagged() {
		gvs, gerrs = c.tagGens(ctx, vks)
	}
	for i, k := range valid {
		if gerrs[i] != nil {
			errs = append(errs, &KeyError{Key: k, Err: c.redisError(ctx, "setmany", k, gerrs[i])})
			continue
		}
		entry, ttl, err := c.encode(values[k], newToken(), gvs[i].gen, 0, 0)
		if err != nil {
			c.ev.notCached(ctx)
			errs = append(errs, &KeyError{Key: k, Err: c.report(ctx, "encode", k, err)})
			bad = append(bad, k)
			continue
		}
		sent = append(sent, k)
		calls = append(calls, c.leases.warm(k, vks[i].ns, entry, ttl))
	}
	if len(bad) > 0 {
		if _, err := c.Invalidate(ctx, bad...); err != nil {
			errs = append(errs, err)
		}
	}
	var done []string // written, or perhaps written: the local tiers drop them
	failed := 0
	if len(calls) > 0 {
		for i, cmd := range c.leases.run(ctx, calls) {
			n, err := cmd.Int64()
			switch {
			case err != nil:
				// It may have landed, or not: delete the key as a failed
				// invalidation would be, and keep this process off it.
				c.retryLater(retryKey, sent[i])
				errs = append(errs, &KeyError{Key: sent[i], Err: c.redisError(ctx, "setmany", sent[i], err)})
				done = append(done, sent[i])
				failed++
			case n == 1:
				done = append(done, sent[i])
			}
		}
	}
	if err := c.invalidated(ctx, done); err != nil {
		errs = append(errs, err)
	}
	return len(done) - failed, errors.Join(errs...)
}
