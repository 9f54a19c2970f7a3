// Per-call choices: GetOptions, and the one place each of them changes what
// the door and the engine do.

package cacheaside

import (
	"context"
	"fmt"
	"time"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// GetOptions are one Get's (or GetMany's) own choices, passed as its last
// argument. Passing none, or the zero GetOptions, means the Cache's
// defaults; passing none costs nothing. A Get that joins another caller's
// load in this process shares that load, and its fill is made with the
// options of the call that started it.
type GetOptions struct {
	// SkipLocal reads Redis, not the local tier (Options.Local), and keeps
	// nothing this call reads or loads in the local tier.
	SkipLocal bool

	// Reload does not answer from what the cache holds: a value, or a
	// cached "not found", is loaded again now under the key's lease (taken
	// in place, as for a value past its TTL, so other Gets go on being
	// served the current value meanwhile), filled, and returned. A loader
	// error is returned, not the old value. A Reload that finds a load
	// already in flight for the key (in this process, or another's lease
	// in Redis) shares it, as a miss does. It implies SkipLocal; a Reload
	// that fills a new value tells every process's local tier (the bus),
	// as an invalidation does, before it returns.
	Reload bool

	// NoStore does not cache what this call loads: a hit is served as
	// usual, but a miss calls the loader directly (no lease, no in-process
	// flight, nothing written to Redis or the local tier). With Reload, the
	// call loads without reading the cache at all.
	NoStore bool

	// TTL, when above 0, is how long a value this call's load stores stays
	// fresh, in place of Policy.TTL and Options.Lifetime (the Policy's
	// jitter and stale windows still apply; a "not found" keeps
	// Policy.NegativeTTL). It may not exceed Policy.TTL, which stays the
	// longest any entry lives.
	TTL time.Duration
}

// errTooManyOptions is the error of a call given more than one GetOptions.
var errTooManyOptions = fmt.Errorf("%w: more than one GetOptions in one call", ErrInvalidOptions)

// perCall returns the choices of a call that passed opts, or an error
// (wrapping ErrInvalidOptions) before any I/O.
func (c *Cache[T]) perCall(opts []GetOptions) (GetOptions, error) {
	switch len(opts) {
	case 0:
		return GetOptions{}, nil
	case 1:
	default:
		return GetOptions{}, errTooManyOptions
	}
	o := opts[0]
	switch {
	case o.TTL < 0:
		return o, fmt.Errorf("%w: GetOptions.TTL %v is negative", ErrInvalidOptions, o.TTL)
	case o.TTL > c.opts.Policy.TTL:
		return o, fmt.Errorf("%w: GetOptions.TTL %v is above Policy.TTL %v, the longest an entry lives", ErrInvalidOptions, o.TTL, c.opts.Policy.TTL)
	case o.TTL > 0 && o.NoStore:
		return o, fmt.Errorf("%w: GetOptions.TTL with NoStore: nothing is stored", ErrInvalidOptions)
	}
	if o.Reload {
		o.SkipLocal = true
	}
	return o, nil
}

// reloadNow turns what a Reload call's first read found into a reload
// (settle calls it only for a Reload, so a hit copies no view):
// a value (fresh or stale) becomes due for reload, without a fallback (the
// loader's error is the answer), and a "not found" an entry to overwrite.
// A value another caller is refreshing is waited for, as a lease is: that
// reload is in flight.
func reloadNow[T any](vw view[T]) view[T] {
	switch vw.state {
	case stFresh, stStale, stReload:
		if vw.e.Kind == envelope.Refreshing {
			vw.state = stLease
			break
		}
		vw.state, vw.staleOK = stReload, false
	case stNotFound:
		tok := vw.e.Token
		vw.replace = tok[:]
		vw.e, vw.state = envelope.Entry{}, stMiss
	}
	return vw
}

// inFlight is reloadNow for what a later lease round found: a value
// another caller is refreshing is still waited for; anything else is that
// caller's fill or a miss, which a Reload shares as any Get does.
func inFlight[T any](o GetOptions, vw view[T]) view[T] {
	if o.Reload && vw.e.Kind == envelope.Refreshing && (vw.state == stFresh || vw.state == stStale) {
		vw.state = stLease
	}
	return vw
}

// loadNoStore loads the misses of a NoStore call: one loader call, on the
// caller's context within LoadTimeout (none once it has ended), with no lease, no in-process flight
// and no slot of MaxLoadsWhileDown (Redis is not down); each op's outcome
// is left in op.res and op.err.
func (c *Cache[T]) loadNoStore(ctx context.Context, ops []*keyOp[T], src source[T]) {
	r := &missRun[T]{c: c, ctx: ctx, src: src, ops: ops}
	if err := ctx.Err(); err != nil { // the caller gave up: nobody else waits for this load
		for _, op := range ops {
			r.finish(op, answer[T]{}, err)
		}
		return
	}
	r.loadUncached(ops)
}
