// Soft load timeouts: a Get whose reload runs past Options.SoftLoadTimeout
// is answered with the old value it has at hand (inside the Policy's
// StaleIfError window), and the reload goes on under its lease and fills
// the entry when it returns.

package cacheaside

import (
	"context"
)

// softAnswer is op's old value as the answer of its flight at the soft
// load timeout. It rests on the lease round that found the value in Redis
// (staleRound), so a Get that joined before that round takes it, and one
// that joined after waits for the reload (see older); the Get that leads
// the flight read the value itself.
func (c *Cache[T]) softAnswer(op *keyOp[T]) answer[T] {
	return answer[T]{v: op.fallback, round: c.vouching(op, op.staleRound), fs: op.fs, soft: true}
}

// softReady reports whether op may be answered with its old value at the
// soft load timeout: someone waits for it, and a lease round found the
// value in Redis.
func (c *Cache[T]) softReady(op *keyOp[T]) bool {
	return c.opts.SoftLoadTimeout > 0 && op.call != nil && op.staleOK && op.staleRound > 0
}

// softAnswers returns what the load of held calls at the soft load
// timeout, or nil when none of held may be answered early: each such
// key's old value is published to the Gets waiting on it (the flight, and
// the load, go on; the load's own answer then reaches only the Gets that
// did not take the old one).
func (r *missRun[T]) softAnswers(held []*keyOp[T]) func() {
	var ready []*keyOp[T]
	for _, op := range held {
		if r.c.softReady(op) {
			ready = append(ready, op)
		}
	}
	if len(ready) == 0 {
		return nil
	}
	return func() {
		counted := func() { r.c.ev.softTimeout(r.ctx) } // before the Gets wake, so their Stats show it
		for _, op := range ready {
			op.call.Publish(r.c.softAnswer(op), nil, counted)
		}
	}
}

// softWait is the context a wait for other processes' holders runs under:
// ctx, ended at the soft load timeout (from the run's start) when an op of
// open may then be answered with its old value.
func (r *missRun[T]) softWait(ctx context.Context, open []*keyOp[T]) (context.Context, context.CancelFunc) {
	for _, op := range open {
		if r.c.softReady(op) {
			return context.WithDeadline(ctx, r.began.Add(r.c.opts.SoftLoadTimeout))
		}
	}
	return ctx, func() {}
}

// softTimedOut answers the ops of open that may be with their old values,
// their holders elsewhere having passed the soft load timeout, and returns
// the rest. The holders' fills reach later Gets.
func (r *missRun[T]) softTimedOut(open []*keyOp[T]) []*keyOp[T] {
	rest := open[:0]
	for _, op := range open {
		if !r.c.softReady(op) {
			rest = append(rest, op)
			continue
		}
		r.releaseUnsure(op)
		r.c.ev.softTimeout(r.ctx)
		r.finish(op, r.c.softAnswer(op), nil)
	}
	return rest
}
