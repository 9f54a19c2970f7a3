// Fills: a loaded value or "not found" encoded and written under the lease, or
// the lease released.

package cacheaside

import (
	"context"
	"fmt"
	"time"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// loadAndFill calls the loader for the ops whose leases the run holds,
// renewing the leases meanwhile, and stores each outcome in one round
// trip: a value, a tombstone for an id the loader left out, or nothing
// (the lease is released; a refreshing entry goes back to a plain value
// that lives for op.keep more).
func (r *missRun[T]) loadAndFill(held []*keyOp[T]) {
	c := r.c
	if c.local != nil {
		for _, op := range held {
			op.snap = c.local.snap(op.key, op.vk) // before the loader reads the source
		}
	}
	stop := c.keepLeases(r.ctx, held)
	vals, found, took, err := r.call(held, r.softAnswers(held))
	stop()
	if err == nil {
		r.publish(held, vals, found)
	}
	if h := c.hooks; h != nil && h.beforeFill != nil {
		for _, op := range held {
			h.beforeFill(op.key)
		}
	}
	// Fill and release must happen even if Close cancelled the run.
	wctx, cancel := context.WithTimeout(context.WithoutCancel(r.ctx), c.opts.LeaseTTL)
	defer cancel()
	calls := make([]scriptCall, len(held))
	if err != nil {
		for i, op := range held {
			calls[i] = c.leases.release(op.key, op.tok, op.keep(c))
		}
		var failed errorOnce
		for i, cmd := range c.leases.run(wctx, calls) {
			n, err := cmd.Int64()
			if err != nil {
				failed.add(held[i].key, err)
				c.releaseLater(held[i].key, held[i].tok, held[i].keep(c)) // or other processes wait out the lease
			} else if n == 2 {
				c.wakeLater(held[i].key, nil, nil)
			}
		}
		failed.report(wctx, c, "release")
		for _, op := range held {
			op.held = false
			r.fail(op, err)
		}
		return
	}
	p := c.opts.Policy
	fills := make([]bool, len(held))
	kept := make([]bool, len(held)) // reloads whose value came back the same: kept, not filled (reloading.go)
	softs := make([]int64, len(held))
	entries := make([][]byte, len(held)) // what each fill writes, for a wake message the Cache publishes
	for i, op := range held {
		switch {
		case found[i]:
			entry, ttl, merr := c.encode(vals[i], op.tok, op.gen, took, r.src.per.TTL)
			if merr != nil {
				c.ev.notCached(r.ctx)
				c.report(r.ctx, "encode", op.key, merr)
				calls[i] = c.leases.release(op.key, op.tok, op.keep(c))
				continue
			}
			if c.unchanged(op, entry) {
				calls[i], kept[i] = c.leases.keep(op.key, op.vk.ns, op.tok, entry, ttl), true
			} else {
				calls[i] = c.leases.fill(op.key, op.vk.ns, op.tok, op.proof, entry, ttl)
			}
			fills[i], softs[i], entries[i] = true, softExpiry(entry), entry
		case p.NoNegativeCache:
			calls[i] = c.leases.release(op.key, op.tok, 0)
		default:
			var zero T
			ttl := p.jitter(c.lifetime(zero, true, took))
			now := c.opts.Clock()
			soft := now.Add(ttl)
			entry := tombstone(op.tok, c.opts.Codec.Format(), op.gen, now, soft)
			calls[i], fills[i], softs[i], entries[i] = c.leases.fill(op.key, op.vk.ns, op.tok, op.proof, entry, ttl), true, soft.UnixMilli(), entry
		}
		if h := c.hooks; h != nil && h.fill != nil && fills[i] {
			calls[i] = h.fill(calls[i])
		}
	}
	rounds := make([]uint64, len(held))
	for i, op := range held {
		rounds[i] = op.fs.round()
	}
	cmds := c.leases.run(wctx, calls)
	var failed errorOnce
	var reloaded []string // keys a Reload call filled with a new value: other processes' local tiers drop their copies
	answers := make([]answer[T], len(held))
	for i, op := range held {
		n, err := cmds[i].Int64()
		var tok envelope.Token
		round := op.round // the load began after this lease round
		switch {
		case err != nil:
			// A fill or a release that failed: release in the background,
			// with retries, or other processes wait out the lease. A fill
			// that did land makes the release a no-op.
			c.releaseLater(op.key, op.tok, op.keep(c))
			failed.add(op.key, err)
		case fills[i] && (n == 1 || n == 2):
			tok, round = op.tok, rounds[i] // the lease stood until the fill
			if kept[i] {
				c.ev.unchanged(wctx)
			}
			switch {
			case r.src.per.Reload && !kept[i]:
				reloaded = append(reloaded, op.key)
			case r.src.per.SkipLocal:
				c.dropLocal(op.key) // no older copy outlives the fill here
			default:
				c.putLocal(op.key, vals[i], !found[i], softs[i], op.snap)
			}
			if n == 2 {
				c.wakeLater(op.key, &op.proof, entries[i])
			}
		case fills[i]:
			c.ev.fillRejected(wctx)
		case n == 2: // a release
			c.wakeLater(op.key, nil, nil)
		}
		op.held = false
		answers[i] = answer[T]{v: vals[i], tok: tok, round: round}
	}
	failed.report(wctx, c, "fill")
	if len(reloaded) > 0 {
		// Before the Reload returns. A failed publish is reported, and
		// those tiers keep their copies up to Local.TTL.
		_ = c.invalidated(wctx, reloaded)
	}
	for i, op := range held {
		r.finish(op, answers[i], notFoundErr(!found[i]))
	}
}

// publish hands each flight's loaded answer to the Gets that joined it
// before the fill: those for which the lease round the load followed
// vouches (see older), which is every Get that began before that round.
// The load read the source after the lease was taken, so after those Gets
// began; their answers need not wait for the fill's round trip, and a
// stampede's waiters wake while the fill is sent. The answer they get is
// the one the flight finishes with, without the filled entry's token.
func (r *missRun[T]) publish(held []*keyOp[T], vals []T, found []bool) {
	for i, op := range held {
		if op.call == nil {
			continue // a background refresh: nobody waits
		}
		a := answer[T]{v: vals[i], round: op.round, fs: op.fs}
		var err error
		if !found[i] {
			a.v, err = *new(T), ErrNotFound
		}
		op.call.Publish(a, err, nil)
	}
}

// encode builds the value entry for v and the lifetime to give it in
// Redis: the jittered TTL plus the jittered stale window. fresh, when
// above 0, is the TTL before jitter (a call's GetOptions.TTL), in place of
// the lifetime.
func (c *Cache[T]) encode(v T, tok envelope.Token, gen envelope.Gen, took, fresh time.Duration) ([]byte, time.Duration, error) {
	payload, err := c.opts.Codec.Marshal(v)
	if err == nil && len(payload) > c.opts.MaxValueSize {
		err = fmt.Errorf("%w: %d bytes, MaxValueSize %d", ErrValueTooLarge, len(payload), c.opts.MaxValueSize)
	}
	if err != nil {
		return nil, 0, err
	}
	p := c.opts.Policy
	if fresh <= 0 {
		fresh = c.lifetime(v, false, took)
	}
	ttl := p.jitter(fresh)
	life := ttl
	if w := p.staleWindow(); w > 0 {
		life += p.jitter(w)
	}
	return envelope.Encode(&envelope.Entry{
		Kind:       envelope.Value,
		Format:     c.opts.Codec.Format(),
		Token:      tok,
		SoftExpiry: c.opts.Clock().Add(ttl).UnixMilli(),
		LoadMillis: uint32(min(took.Milliseconds(), 1<<32-1)),
		Gen:        gen,
		Written:    c.opts.Clock().UnixMilli(),
		Payload:    payload,
	}), life, nil
}

// lifetime is how long an entry of v (or a "not found") stays fresh,
// before jitter: Options.Lifetime's answer within the Policy's bound.
func (c *Cache[T]) lifetime(v T, notFound bool, took time.Duration) time.Duration {
	p := c.opts.Policy
	bound := p.TTL
	if notFound {
		bound = p.NegativeTTL
	}
	if f := c.opts.Lifetime; f != nil {
		if d := f(v, notFound, took); d > 0 && d < bound {
			return d
		}
	}
	return bound
}

// softExpiry reads the soft expiry back from an encoded entry.
func softExpiry(entry []byte) int64 {
	var e envelope.Entry
	if envelope.Decode(entry, &e) != nil {
		return 0
	}
	return e.SoftExpiry
}
