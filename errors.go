// Errors: every sentinel and error type the package returns.

package cacheaside

import (
	"errors"
	"fmt"
)

var (
	// ErrNotFound is what a loader returns when the item does not exist
	// (Options.IsNotFound maps other errors such as sql.ErrNoRows to it).
	// Get caches that answer as a tombstone for the policy's negative TTL and
	// returns an error for which errors.Is(err, ErrNotFound) holds, both on
	// the load that found nothing and on every later tombstone hit.
	ErrNotFound = errors.New("cacheaside: not found")

	// ErrInvalidKey is returned by Get, Set and Invalidate for an empty key
	// or one longer than Options.MaxKeySize. Nothing is sent to Redis and the
	// loader is not called.
	ErrInvalidKey = errors.New("cacheaside: invalid key")

	// ErrInvalidOptions is wrapped by every error New and the policy
	// validators return for a setting they refuse.
	ErrInvalidOptions = errors.New("cacheaside: invalid options")

	// ErrRedisUnavailable is matched by the errors of Redis commands the
	// circuit breaker did not send, and by what Get returns under the
	// FailClosed policy when Redis cannot be used.
	ErrRedisUnavailable = errors.New("cacheaside: redis unavailable")

	// ErrOverloaded is returned by Get when Redis cannot be used and
	// MaxLoadsWhileDown loads are already running: at once with
	// FailFastWhenCapped, else when the caller's context ends first.
	ErrOverloaded = errors.New("cacheaside: too many loads while redis is unavailable")

	// ErrClosed is returned by every method called after Close.
	ErrClosed = errors.New("cacheaside: cache closed")

	// ErrLoaderPanic is matched (errors.Is) by every *PanicError: the
	// loader panicked, or a codec, hook or Recorder did during the load
	// (the error's text says which).
	ErrLoaderPanic = errors.New("cacheaside: loader panicked")

	// ErrValueTooLarge is passed to the error hooks when a loaded value
	// encodes to more than Options.MaxValueSize bytes. The value is still
	// returned to the caller; it is just not cached.
	ErrValueTooLarge = errors.New("cacheaside: value too large to cache")

	// ErrCorruptEntry is passed to the error hooks when the bytes under a key
	// cannot be decoded (foreign data, an unknown format version, a payload
	// the codec rejects). Get treats the key as a miss and overwrites it.
	ErrCorruptEntry = errors.New("cacheaside: corrupt cache entry")

	// ErrNotPublished is matched by the error of an Invalidate,
	// InvalidatePrefix, InvalidateNamespace or Set whose change landed in
	// Redis but whose message to other processes' local tiers
	// (Options.Local) could not be published. Nothing is queued: Redis
	// holds the new state, and other processes' local tiers serve the old
	// value for at most LocalOptions.TTL. When the change itself failed,
	// the error is the Redis failure's (an *OpError) and does not match
	// ErrNotPublished: the queued retry publishes once it lands.
	ErrNotPublished = errors.New("cacheaside: applied in Redis, but other processes' local tiers were not told")

	// ErrNoPubSub is matched by what WaitLocal returns, and by the
	// ErrNotPublished errors of writes, when the Redis server refuses
	// SUBSCRIBE or PUBLISH ("unknown command": renamed or disabled
	// commands, a proxy without pub/sub; or an ACL "NOPERM"). It is a
	// configuration problem, not an outage: Options.Local cannot work on
	// such a server, and the local tier stays bypassed (Gets read Redis).
	ErrNoPubSub = errors.New("cacheaside: the Redis server refuses pub/sub, which Options.Local needs")
)

// PanicError is the error every caller sharing a load receives when the
// loader panicked, or when a codec, a hook (IsNotFound, OnError) or the
// Recorder panicked during the load; Error says which. The lease is
// released before the error is returned, so the next Get loads again;
// nothing is cached. Value is what was passed to panic and Stack the
// panicking goroutine's stack at that point.
type PanicError struct {
	Value any
	Stack []byte

	in string // what panicked, when not the loader
}

// panicIn is a PanicError for a panic in what (a codec, a hook...), not
// in the loader.
func panicIn(what string, v any, stack []byte) *PanicError {
	return &PanicError{Value: v, Stack: stack, in: what}
}

func (e *PanicError) Error() string {
	if e.in != "" {
		return fmt.Sprintf("cacheaside: panic in %s during a load: %v", e.in, e.Value)
	}
	return fmt.Sprintf("cacheaside: loader panicked: %v", e.Value)
}

// Is reports whether target is ErrLoaderPanic.
func (e *PanicError) Is(target error) bool { return target == ErrLoaderPanic }

// Unwrap returns the panic value when it is an error.
func (e *PanicError) Unwrap() error {
	if err, ok := e.Value.(error); ok {
		return err
	}
	return nil
}

// OpError describes a Redis or encoding failure that Get suppressed (it
// still returned the loader's value) or that a write returned. It reaches
// Options.OnError and the logger. Op is the step that failed:
//
//	get                   the first read of a Get or GetMany
//	acquire, refresh      a lease round (refresh: a value's refresh lease, or a background refresh that panicked)
//	fill, release, extend writing the loaded value, letting a lease go, renewing it
//	decode, encode        undecodable bytes under a key; a value the codec could not encode
//	set                   Set
//	invalidate, invalidate-prefix, invalidate-namespace
//	                      Invalidate, InvalidatePrefix, InvalidateNamespace
//	publish, bus          a message to other local tiers; an unreadable one received
//
// Key is the key (the prefix, the generation key, a channel, or a list of
// keys for a batch).
type OpError struct {
	Cache string // Options.Name
	Op    string
	Key   string
	Err   error
}

func (e *OpError) Error() string {
	return fmt.Sprintf("cacheaside: %s: %s %q: %v", e.Cache, e.Op, e.Key, e.Err)
}

func (e *OpError) Unwrap() error { return e.Err }

var errNilLoader = errors.New("cacheaside: Get with a nil Loader")

// errLoaderExited is returned to the callers of a load whose loader called
// runtime.Goexit (for example t.FailNow in a test).
var errLoaderExited = errors.New("cacheaside: loader called runtime.Goexit")

// KeyError is the error of one key of a GetMany. GetMany joins them.
type KeyError struct {
	Key string
	Err error
}

func (e *KeyError) Error() string { return fmt.Sprintf("cacheaside: key %q: %v", e.Key, e.Err) }

func (e *KeyError) Unwrap() error { return e.Err }

// errNilBatch names the nil argument of a GetMany.
func errNilBatch(arg string) error {
	return fmt.Errorf("cacheaside: GetMany: %s is nil", arg)
}

// errReplyLength is the error of a multi-key reply (MGET) whose length
// is not the number of keys asked for.
func errReplyLength(cmd string, got, want int) error {
	return fmt.Errorf("cacheaside: %s returned %d values for %d keys", cmd, got, want)
}

// errShardedScan is returned by InvalidatePrefix on a client that shards
// keys across nodes (it answered CROSSSLOT) but offers no way to visit
// every node.
var errShardedScan = errors.New("cacheaside: InvalidatePrefix needs every node, and this client shards keys without ForEachMaster or ForEachShard; pass the *redis.ClusterClient or *redis.Ring itself, or give the wrapper one of those methods")

// errReadQueued is the error of a queued read whose budget ran out first.
var errReadQueued = errors.New("cacheaside: coalesced read: budget spent waiting in the queue")

// errBreakerOpen is the error of every command the open breaker skips.
var errBreakerOpen = fmt.Errorf("%w: circuit breaker open", ErrRedisUnavailable)

// errExcluded marks a result that must not move the breaker: the caller's
// own cancellation.
var errExcluded = errors.New("excluded")

// errStarved marks a command that timed out because this process was not
// scheduled in time, not because Redis was slow: its deadline fired well
// after it was due (a CPU quota's throttling, a starved host), so the
// reply may well have been waiting on the socket; or a coalesced read that
// waited out its time in this process's queue. Such a timeout stays out
// of the breaker, out of RedisErrors (Stats.Starved counts it) and out of
// the "Redis is down" decision: the Get goes on with Redis (guard.go).
var errStarved = errors.New("cacheaside: Redis reply read late: this process was not scheduled in time")

// errWaitedOut ends a wait that reached its bound.
var errWaitedOut = errors.New("cacheaside: lease holders neither filled nor expired in time")

// errNoAnswer ends a flight an engine run left open without an answer,
// which only a bug would do (a panic ends them with a *PanicError).
var errNoAnswer = errors.New("cacheaside: load ended without an answer")

// errRedisTimeSpent is the error of a command a Get did not send because
// its Redis time (Degradation.RedisTimePerGet) was spent.
var errRedisTimeSpent = fmt.Errorf("%w: the Get's Redis time (Degradation.RedisTimePerGet) is spent", ErrRedisUnavailable)
