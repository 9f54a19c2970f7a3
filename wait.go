// Waiting for other holders: how a Get or GetMany waits while another
// caller (usually another process) holds the lease on its keys: woken by the
// holder's fill, with polling as the fallback.

package cacheaside

import (
	"context"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// Waking. When a caller finds another's lease, acquire.lua marks the lease
// contended. The holder's fill (or release, if its load failed) then
// publishes the key on the cache's wake channel, inside the same script (on
// a sharded hub the script reports the contended lease and the Cache
// publishes: wakeLater), so an uncontended miss costs nothing more and a
// hit never sees any of it. Every Cache subscribes to that channel on its
// client's shared subscription connection (sub.go; the channel is
// wakeChannelPrefix + Options.Name) and wakes the
// runs waiting for that key at once. Polling stays, slower, for what a
// message cannot cover: a holder that died (its lease expires), a message
// lost while the subscription was down, a lease another build of the
// library holds.
//
// Trust. Anyone who may PUBLISH on the channel can send a message, and
// anyone who may GET the key can read the lease's token. So a message
// hands a waiter its answer only with the lease's proof: the holder draws
// a random 16-byte proof and takes the lease under its token, the first 16
// bytes of SHA-256(proof) (envelope.LeaseToken); the fill publishes the
// proof beside the entry, and the waiter checks it against the token of
// the lease it waits for (missRun.delivered). Any other message only makes
// the waiter look again in Redis, as a poll would.

// wakeChannelPrefix + Options.Name is the channel fills of contended leases
// are published on. Every process that shares a cache's keys must use the
// same Name.
const wakeChannelPrefix = wire.WakeChannelPrefix

// waker dispatches the wake channel's messages to the runs waiting for
// their keys.
type waker struct {
	channel string
	live    atomic.Bool // the subscription is confirmed: waits may rely on it

	mu      sync.Mutex
	watches map[string]map[*watch]struct{} // key → runs waiting for it
}

// watch is one engine run's interest in its keys.
type watch struct {
	keys []string
	ch   chan struct{}      // one pending wake-up
	got  map[string]wakeMsg // key → what its fill published, under waker.mu
}

// wakeMsg is what a fill published for one key: the lease's proof and the
// entry written, or neither (a release, an entry past 64 KiB).
type wakeMsg struct {
	proof envelope.Token
	entry []byte
}

// answers reports whether m carries the fill of the lease whose token is
// tok: an entry, and the proof that tok was derived from.
func (m wakeMsg) answers(tok envelope.Token) bool {
	return m.entry != nil && envelope.LeaseToken(m.proof) == tok
}

func newWaker(channel string) *waker {
	return &waker{channel: channel, watches: make(map[string]map[*watch]struct{})}
}

// watch registers interest in keys.
func (w *waker) watch(keys []string) *watch {
	wt := &watch{keys: keys, ch: make(chan struct{}, 1)}
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, k := range keys {
		m := w.watches[k]
		if m == nil {
			m = make(map[*watch]struct{})
			w.watches[k] = m
		}
		m[wt] = struct{}{}
	}
	return wt
}

func (w *waker) unwatch(wt *watch) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, k := range wt.keys {
		if m := w.watches[k]; m != nil {
			delete(m, wt)
			if len(m) == 0 {
				delete(w.watches, k)
			}
		}
	}
}

// wake handles one message: "<len(key)>:<key><proof><entry>", proof and
// entry optional. It wakes every run waiting for key, handing it both.
func (w *waker) wake(msg string) {
	key, m, ok := parseWake(msg)
	if !ok {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for wt := range w.watches[key] {
		if wt.got == nil {
			wt.got = make(map[string]wakeMsg)
		}
		wt.got[key] = m
		select {
		case wt.ch <- struct{}{}:
		default:
		}
	}
}

// parseWake splits a wake message into its key, and the proof and entry
// it carries (none for a message of the key alone; a message with no more
// bytes after the key than a proof is malformed).
func parseWake(msg string) (key string, m wakeMsg, ok bool) {
	i := strings.IndexByte(msg, ':')
	if i <= 0 {
		return "", m, false
	}
	n, err := strconv.Atoi(msg[:i])
	if err != nil || n < 0 || len(msg)-i-1 < n {
		return "", m, false
	}
	key = msg[i+1 : i+1+n]
	switch rest := msg[i+1+n:]; {
	case rest == "":
	case len(rest) <= envelope.TokenSize:
		return "", m, false
	default:
		copy(m.proof[:], rest)
		m.entry = []byte(rest[envelope.TokenSize:])
	}
	return key, m, true
}

// wakeMessage is the message fill.lua publishes, for the Cache to publish
// itself (wakeLater): "<len(key)>:<key>", then the proof and the entry
// unless there is no proof or the entry is past maxWakeEntry.
func wakeMessage(key string, proof *envelope.Token, entry []byte) []byte {
	msg := strconv.AppendInt(nil, int64(len(key)), 10)
	msg = append(msg, ':')
	msg = append(msg, key...)
	if proof != nil && len(entry) <= maxWakeEntry {
		msg = append(msg, proof[:]...)
		msg = append(msg, entry...)
	}
	return msg
}

// maxWakeEntry is the largest entry a wake message carries (fill.lua's
// 65536): a larger one costs every subscriber more than the read it saves.
const maxWakeEntry = 64 << 10

// wakeLater publishes the wake message of a contended lease that a fill
// (proof and entry) or a release (neither) script reported and could not
// publish itself (a sharded hub), in the background: the holder's callers
// have their answer already. On failure the waiters poll, as they do for a
// lost message. Its callers (an engine run, a release retry) hold a slot
// of c.wg, so it publishes during Close too, as the scripts do.
func (c *Cache[T]) wakeLater(key string, proof *envelope.Token, entry []byte) {
	if c.wake == nil {
		return
	}
	msg := wakeMessage(key, proof, entry)
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		ctx := context.WithoutCancel(c.stop)
		if err := c.guard.publish(ctx, c.hub, c.wake.channel, msg); err != nil && !refusesPubSub(err) {
			c.ev.redisError(c.stop, "wake", err) // a refusal is not a failure: the waiters poll, as with the scripts' pcall
		}
	}()
}

// delivered takes the entries fills published for the watch's keys since
// the last call.
func (w *waker) delivered(wt *watch) map[string]wakeMsg {
	w.mu.Lock()
	defer w.mu.Unlock()
	got := wt.got
	wt.got = nil
	return got
}

// listenWake keeps the wake channel subscribed until Close.
func (c *Cache[T]) listenWake() {
	defer c.wg.Done()
	w := c.wake
	s := &subscriber{channel: w.channel, hc: time.Second,
		up: func() { w.live.Store(true) },
		down: func(error, bool) {
			// Not counted as a Redis error: waits fall back to polling,
			// and the commands that matter report their own failures.
			w.live.Store(false)
		},
		message: w.wake,
	}
	s.run(c.hub, c.stop)
	w.live.Store(false)
}

// waiter paces the lease rounds of one engine run whose keys other
// holders are loading. While the wake channel is live, it waits for a
// fill's message, polling every 4 × PollMax (jittered) as the fallback;
// otherwise it polls with a jittered exponential backoff from PollMin to
// PollMax. Either way it waits at most LoadTimeout + LeaseTTL in all (a
// live holder renews its lease while it loads, so a longer wait means a
// holder stuck without failing), after which the run loads from the source
// itself.
type waiter struct {
	ev      *events
	wk      *waker // nil: poll only
	wt      *watch // while registered
	start   time.Time
	delay   time.Duration
	max     time.Duration
	deadAt  time.Duration // the whole wait's bound
	waiting bool
}

func (c *Cache[T]) newWaiter() *waiter {
	return &waiter{ev: c.ev, wk: c.wake, delay: c.opts.PollMin, max: c.opts.PollMax, deadAt: c.opts.LoadTimeout + c.opts.LeaseTTL}
}

// wait waits before the next lease round for the keys of open, held
// elsewhere. It returns errWaitedOut once the whole wait has reached its
// bound, or ctx's error when ctx ends first.
func (w *waiter) wait(ctx context.Context, open []string) error {
	if !w.waiting {
		w.waiting = true
		w.start = time.Now()
		w.ev.leaseContended(ctx, len(open))
		if w.wk != nil && w.wk.live.Load() {
			// Watch first, then look once more at once: a fill that landed
			// between the last round and the watch sent its message to
			// nobody, but the next round sees its value.
			w.wt = w.wk.watch(open)
			return nil
		}
	} else if time.Since(w.start) > w.deadAt {
		return errWaitedOut
	}
	if w.wt != nil && w.wk.live.Load() {
		t := time.NewTimer(spread(4 * w.max))
		defer t.Stop()
		select {
		case <-w.wt.ch:
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		}
		return nil
	}
	if err := sleep(ctx, spread(w.delay)); err != nil {
		return err
	}
	w.delay = min(2*w.delay, w.max)
	return nil
}

// delivered returns the entries fills published for the keys being waited
// for since the last call (nil without a watch).
func (w *waiter) delivered() map[string]wakeMsg {
	if w.wt == nil {
		return nil
	}
	return w.wk.delivered(w.wt)
}

// end records how long the run waited, if it did, and drops its watch.
func (w *waiter) end() {
	if w.wt != nil {
		w.wk.unwatch(w.wt)
	}
	if w.waiting {
		w.ev.waited(time.Since(w.start))
	}
}

// sleep waits for d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
