// In-process flights: one load per key per process, and what a Get that
// joins another's load must check before trusting its answer.

package cacheaside

import (
	"context"
	"errors"
	"runtime/debug"
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
	answer    envelope.Token                 // set by the flight before it returns: the entry holding its answer (zero: none)
	seq       uint64                         // this flight's number in Cache.flights
}

// answer is what a shared load delivers: the value, and the token of the
// Redis entry that holds it (zero when the answer is not in Redis).
type answer[T any] struct {
	v   T
	tok envelope.Token
	fs  *flightState // the flight that produced it
}

// observe marks a lease script about to be sent: until its reply is
// published, nobody can tell whether it ran before or after a write.
func (f *flightState) observe() { f.observing.Store(true); f.tok.Store(nil) }

// flightSeen is the in-process load a Get found before its own read.
type flightSeen struct {
	f         *flightState
	observing bool // f had already sent a lease script
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

// shared runs one load per key in this process and waits for it on ctx.
//
// start is how many flights had begun before the Get's read: a flight
// numbered after it began after the Get did, so whatever it observes is
// recent enough. Only an older flight needs joinable, or the check.
func (c *Cache[T]) shared(ctx context.Context, key, genKey string, load Loader[T], vw view[T], redisDown bool, seen flightSeen, attempt int, start uint64) (T, error) {
	var tok *envelope.Token
	if vw.e.Token != (envelope.Token{}) {
		tok = &vw.e.Token
	}
	trusted := seen.joinable(tok)
	call, leader := c.group.Do(key, func() (answer[T], error) {
		fs := c.startFlight(key)
		defer c.endFlight(key, fs)
		return c.runFlight(ctx, key, genKey, load, vw, redisDown, fs)
	})
	select {
	case <-call.Done():
		a, err := call.Result()
		if leader {
			return a.v, err
		}
		return c.joined(ctx, key, genKey, load, a, err, seen, trusted, redisDown, attempt, start)
	case <-ctx.Done():
		var zero T
		return zero, ctx.Err()
	}
}

// runFlight runs one in-process flight for key and returns its answer. A
// panic anywhere in it (a codec, a hook, a Recorder) would end the process
// on the flight's goroutine; it becomes an error for its callers instead.
// Loader panics are caught closer, in callLoader, where the lease is
// released.
func (c *Cache[T]) runFlight(parent context.Context, key, genKey string, load Loader[T], vw view[T], redisDown bool, fs *flightState) (a answer[T], err error) {
	defer func() {
		if r := recover(); r != nil {
			a, err = answer[T]{fs: fs}, &PanicError{Value: r, Stack: debug.Stack()}
		}
	}()
	v, err := c.run(parent, key, genKey, load, vw, redisDown, fs)
	return answer[T]{v, fs.answer, fs}, err
}

// startFlight publishes the flight that is about to load key.
func (c *Cache[T]) startFlight(key string) *flightState {
	fs := &flightState{seq: c.flights.Add(1)}
	c.inflight.Store(key, fs)
	return fs
}

func (c *Cache[T]) endFlight(key string, fs *flightState) { c.inflight.CompareAndDelete(key, fs) }

// joined is what a Get that joined another caller's flight returns: that
// flight's answer, unless the flight is older than the Get and the entry
// holding its answer is gone from Redis, when the Get starts over once
// (see flightSeen.joinable).
func (c *Cache[T]) joined(ctx context.Context, key, genKey string, load Loader[T], a answer[T], err error, seen flightSeen, trusted, redisDown bool, attempt int, start uint64) (T, error) {
	c.stats.coalesced.Add(1)
	c.rec.Coalesced(c.name)
	// A Get whose own read failed cannot check anything in Redis either,
	// and a start-over would only load again.
	older := a.fs != nil && a.fs.seq <= start && !(a.fs == seen.f && trusted) && !redisDown
	if older && attempt < maxRejoins && (err == nil || errors.Is(err, ErrNotFound)) && !c.holds(ctx, key, genKey, a.tok) {
		return c.get(ctx, key, load, attempt+1)
	}
	return a.v, err
}

// holds reports whether key still holds the entry written under tok, in
// the current namespace generation.
func (c *Cache[T]) holds(ctx context.Context, key, genKey string, tok envelope.Token) bool {
	if tok == (envelope.Token{}) {
		return false
	}
	b, gv, err := c.read(ctx, key, genKey)
	if err != nil || len(b) < envelope.HeaderSize {
		return false
	}
	var e envelope.Entry
	if envelope.Decode(b, &e) != nil || e.Token != tok {
		return false
	}
	return !gv.namespaced || (gv.known && gv.gen == e.Gen)
}
