// In-process flights: one load per key per process, and what a Get that
// joins another's load must check before trusting its answer.

package cacheaside

import (
	"context"
	"errors"
	"sync/atomic"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// maxRejoins bounds how often a Get that joined an in-process load it
// could not trust starts over (see flightSeen.joinable).
const maxRejoins = 1

// flightState is what an in-process load has observed in Redis, published
// for the Gets that may join it.
type flightState struct {
	observing atomic.Bool                    // it has sent (or is sending) a lease script
	tok       atomic.Pointer[envelope.Token] // token of the entry its answer rests on; nil while a reply is pending
	rounds    atomic.Uint64                  // its lease rounds, loads without Redis and fills begun (see round)
	holding   atomic.Bool                    // it holds the key's lease: its fill will vouch for its answer
	stale     atomic.Bool                    // it may answer with the old value at the soft load timeout: Gets read rather than join unread
	seq       uint64                         // this flight's number in Cache.flights

	begun     chan struct{} // closed once its first lease round answered, or it loads without Redis (shared.go)
	beginOnce atomic.Bool
}

// begin marks the flight's first lease round answered: it holds the lease,
// waits for another holder, or has its answer. The Gets that shared its
// first Get's read wake now (shared.go), while the loader runs.
func (f *flightState) begin() {
	if f.begun != nil && f.beginOnce.CompareAndSwap(false, true) {
		close(f.begun)
	}
}

// answer is what a shared load delivers: the value, the token of the
// Redis entry that holds it (zero when the answer is not in Redis), and
// the round of its flight the answer rests on (0: none a joiner may rely
// on; see joined).
type answer[T any] struct {
	v     T
	tok   envelope.Token
	round uint64
	fs    *flightState // the flight that produced it
	soft  bool         // the old value, published at the soft load timeout: the leader's caller takes it too
}

// observe marks a lease script about to be sent: until its reply is
// published, nobody can tell whether it ran before or after a write. It
// returns the round it begins.
func (f *flightState) observe() uint64 {
	f.observing.Store(true)
	f.tok.Store(nil)
	return f.rounds.Add(1)
}

// round marks a step that vouches for the answer without changing what
// Gets that read now would see (a fill: the entry it writes carries the
// lease's token), and returns its number.
func (f *flightState) round() uint64 { return f.rounds.Add(1) }

// flightSeen is the in-process load a Get found before its own read.
type flightSeen struct {
	f         *flightState
	observing bool   // f had already sent a lease script
	rounds    uint64 // f's rounds begun by then
	holding   bool   // f held the key's lease by then
	stale     bool   // f may answer with the old value at the soft load timeout
}

// joinable reports whether a Get that found seen before its read, and read
// an entry with token tok (nil: absent or undecodable), may take that
// load's answer without checking it.
//
// A Get must not return a value older than a write whose invalidation
// returned before the Get started, and the invalidation may have come from
// another process, which cannot reach this one's loads. What it can see is
// the key: invalidation deletes it, and tokens never repeat. If the load
// had observed nothing before this Get's read, whatever it observes comes
// later and is fresh enough. If it had, and this Get's read (made after it
// started) shows the entry the load published, no invalidation removed that
// entry before the read, and the load's answer is at least as new. In every
// other case the Get still joins (so a stampede stays one load), but checks
// afterwards that the entry holding the answer is still in Redis, and
// starts over if it is not.
func (s flightSeen) joinable(tok *envelope.Token) bool {
	if s.f == nil || !s.observing {
		return true
	}
	pub := s.f.tok.Load()
	return pub != nil && tok != nil && *pub == *tok
}

// seenFlight returns the in-process load of key, if any, as a Get finds
// it before its own read.
func (c *Cache[T]) seenFlight(key string) flightSeen {
	if f, ok := c.inflight.Load(key); ok {
		fs := f.(*flightState)
		return flightSeen{fs, fs.observing.Load(), fs.rounds.Load(), fs.holding.Load(), fs.stale.Load()}
	}
	return flightSeen{}
}

// join joins the in-process flight of each op's key, or starts one, and
// hands the flights this caller leads to the engine, all in one run.
func (c *Cache[T]) join(ctx context.Context, ops []*keyOp[T], src source[T]) {
	var owned []*keyOp[T]
	for _, op := range ops {
		var tok *envelope.Token
		if op.vw.e.Token != (envelope.Token{}) {
			tok = &op.vw.e.Token
		}
		op.trusted = op.seen.joinable(tok)
		if op.call == nil { // a Get that shared a read may have been handed its flight (shared.go)
			op.call, op.leader = c.group.Join(op.key)
		}
		if op.leader {
			op.fs = c.startFlight(op.key)
			owned = append(owned, op)
		} else if op.attempt == 0 { // a Get that starts over was counted when it first joined
			c.ev.coalesced(ctx)
		}
		if h := c.hooks; h != nil && h.joined != nil {
			h.joined(op.key)
		}
	}
	if len(owned) > 0 {
		c.start(ctx, owned, src)
	}
}

// await waits on ctx for op's flight and returns its answer: the leader's
// as it is, a joiner's after the check of joined. A ctx that has ended
// already wins over an answer that is also ready, so which of the two a
// caller gets does not depend on the select's choice.
func (c *Cache[T]) await(ctx context.Context, op *keyOp[T], src source[T]) (T, error) {
	if err := ctx.Err(); err != nil {
		var zero T
		return zero, err
	}
	if op.shared != nil {
		c.handOn(ctx, op)
	}
	// The loader's answer, published before the fill (fill.go), is a
	// joiner's if it needs no check (see older). The leader's own caller
	// waits for the fill, so a Get that loaded returns with its entry in
	// Redis, unless the answer is the old value at the soft load timeout
	// (soft.go).
	if !wait(ctx, op.call.Early()) {
		var zero T
		return zero, ctx.Err()
	}
	if !op.call.Finished() {
		a, err := op.call.EarlyResult()
		switch {
		case op.leader && a.soft || !op.leader && !op.older(a):
			return a.v, err
		case a.soft && c.hooks != nil && c.hooks.softAny:
			return a.v, err
		case a.soft && op.staleOK:
			return op.fallback, nil // the old value this Get's own read found (soft.go)
		}
	}
	if !wait(ctx, op.call.Done()) {
		var zero T
		return zero, ctx.Err()
	}
	a, err := op.call.Result()
	if op.leader {
		return a.v, err
	}
	return c.joined(ctx, op, a, err, src)
}

// startFlight publishes the flight that is about to load key.
func (c *Cache[T]) startFlight(key string) *flightState {
	fs := &flightState{seq: c.flights.Add(1), begun: make(chan struct{})}
	c.inflight.Store(key, fs)
	return fs
}

func (c *Cache[T]) endFlight(key string, fs *flightState) { c.inflight.CompareAndDelete(key, fs) }

// joined is what a Get that joined another caller's flight returns: that
// flight's answer, unless the flight is older than the Get and the entry
// holding its answer is gone from Redis, when the Get starts over once
// (see flightSeen.joinable).
//
// op.start is how many flights had begun before the Get's read: a flight
// numbered after it began after the Get did, so whatever it observes is
// recent enough. Only an older flight needs joinable, a later round, or
// the check.
//
// Rounds. An answer that rests on a round of its flight begun after the
// Get's prepare is recent enough too, as the Get's own read would have
// been: a lease round that found the answer in Redis ran after the Get
// began; so did a load without Redis (it read the source then); and so
// did a fill that landed, which proves the lease still stood in Redis
// then: an invalidation that returned before the Get began either came
// after the lease was taken, deleted it and made that fill fail, or came
// before it, and the load (begun once the lease was taken) read the
// source after the write. An answer a wake message delivered rests on no
// round (0): that fill may have landed before the Get began.
func (c *Cache[T]) joined(ctx context.Context, op *keyOp[T], a answer[T], err error, src source[T]) (T, error) {
	if op.older(a) && op.attempt < maxRejoins && (err == nil || errors.Is(err, ErrNotFound)) && !c.holds(ctx, op.key, op.vk, a.tok) {
		return c.one(ctx, op.key, op.idx, src, op.attempt+1)
	}
	return a.v, err
}

// older reports whether a, the answer of the flight op joined, needs the
// check of joined: the flight began before op's read, and none of the
// reasons above vouches for a. A Get whose own read failed cannot check
// anything in Redis either, and a start-over would only load again.
func (op *keyOp[T]) older(a answer[T]) bool {
	vouched := a.fs == op.seen.f && (op.trusted || a.round > op.seen.rounds)
	return a.fs != nil && a.fs.seq <= op.start && !vouched && !op.down
}

// holds reports whether key still holds the entry written under tok, of
// the current generation of its namespace or tags.
func (c *Cache[T]) holds(ctx context.Context, key string, vk verKeys, tok envelope.Token) bool {
	if tok == (envelope.Token{}) {
		return false
	}
	b, gv, err := c.read(ctx, key, vk)
	if err != nil || len(b) < envelope.HeaderSize {
		return false
	}
	var e envelope.Entry
	if envelope.Decode(b, &e) != nil || e.Token != tok {
		return false
	}
	return !gv.versioned || (gv.known && gv.gen == e.Gen)
}
