// Subscriptions: one pub/sub connection per client, shared by every Cache
// on it and by both of their channels (the local tier's invalidation bus
// and the wake channel), kept subscribed until the last Cache closes, with
// a health check.

package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"net"
	"reflect"
	"runtime/debug"
	"slices"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// One connection per client. Every Cache on one client value (as given to
// New) registers its channels with the client's hub, which holds one
// PubSub with all of them, adds and drops channels on it as Caches come
// and go (SUBSCRIBE and UNSUBSCRIBE on the live connection), and hands
// each message to the subscribers of its channel. When the connection is
// lost every subscriber hears it (down), and each hears up again once its
// channel is confirmed on the next connection. So a process holds one
// subscription connection per client, however many Caches it has. A
// client value that is not comparable (a wrapper holding a map, say)
// cannot be told apart from others: each of its Caches gets a hub of its
// own.

// subscriber is one Cache's interest in one channel: what to run when the
// subscription is confirmed (up), lost (down; confirmed says whether it
// had been up), and for each message. They all run on the hub's goroutine,
// one at a time and in order, and must not block.
type subscriber struct {
	bus     Bus
	channel string
	hc      time.Duration // silence before a PING; as long again for its PONG

	up      func()
	down    func(err error, confirmed bool)
	message func(payload string)
}

// run registers s with its client's hub and keeps it there until stop
// ends.
func (s *subscriber) run(stop context.Context) {
	h := joinHub(s.bus)
	h.add(s)
	<-stop.Done()
	h.remove(s)
	leaveHub(h)
}

// hubs holds the live hubs by client value.
var hubs = struct {
	mu sync.Mutex // protects m and every hub's refs
	m  map[any]*hub
}{m: make(map[any]*hub)}

// hub is one client's shared subscription.
type hub struct {
	bus  Bus
	key  any // in hubs.m; nil for a hub of its own
	refs int // under hubs.mu

	mu        sync.Mutex
	subs      map[string]map[*subscriber]struct{} // channel → its subscribers
	ps        *redis.PubSub                       // the live connection; nil between connections
	confirmed map[string]bool                     // channels confirmed on ps
	wasUp     map[*subscriber]bool                // subscribers told up on ps

	wake chan struct{} // a subscriber came: the loop may be waiting for one
	stop context.CancelFunc
	done chan struct{}
}

func joinHub(bus Bus) *hub {
	var key any
	if reflect.ValueOf(bus).Comparable() {
		key = bus
	}
	hubs.mu.Lock()
	defer hubs.mu.Unlock()
	if key != nil {
		if h := hubs.m[key]; h != nil {
			h.refs++
			return h
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := &hub{bus: bus, key: key, refs: 1, subs: make(map[string]map[*subscriber]struct{}),
		confirmed: make(map[string]bool), wasUp: make(map[*subscriber]bool),
		wake: make(chan struct{}, 1), stop: cancel, done: make(chan struct{})}
	if key != nil {
		hubs.m[key] = h
	}
	go h.run(ctx)
	return h
}

// leaveHub drops one reference to h, and stops it with the last.
func leaveHub(h *hub) {
	hubs.mu.Lock()
	h.refs--
	last := h.refs == 0
	if last && h.key != nil {
		delete(hubs.m, h.key)
	}
	hubs.mu.Unlock()
	if last {
		h.stop()
		<-h.done
	}
}

// add registers s. On a live connection its channel is subscribed at once;
// when that channel is confirmed there already, a PING asks the hub's
// goroutine to tell s it is up (its PONG comes after every message sent
// before it, and the callbacks of s stay on that one goroutine, in
// order). Otherwise the next connection includes it.
func (h *hub) add(s *subscriber) {
	h.mu.Lock()
	m := h.subs[s.channel]
	fresh := m == nil
	if fresh {
		m = make(map[*subscriber]struct{})
		h.subs[s.channel] = m
	}
	m[s] = struct{}{}
	ps, confirmed := h.ps, h.confirmed[s.channel]
	h.mu.Unlock()
	select {
	case h.wake <- struct{}{}:
	default:
	}
	if ps == nil {
		return
	}
	// Writes only (the replies come to the hub's goroutine); a failure
	// breaks the connection, and the next one subscribes everything.
	ctx, cancel := context.WithTimeout(context.Background(), s.hc)
	defer cancel()
	switch {
	case confirmed:
		_ = ps.Ping(ctx)
	case fresh:
		_ = ps.Subscribe(ctx, s.channel)
	}
}

// remove unregisters s, and unsubscribes its channel when s was the last
// subscriber of it.
func (h *hub) remove(s *subscriber) {
	h.mu.Lock()
	m := h.subs[s.channel]
	delete(m, s)
	delete(h.wasUp, s)
	last := len(m) == 0
	if last {
		delete(h.subs, s.channel)
		delete(h.confirmed, s.channel)
	}
	ps := h.ps
	h.mu.Unlock()
	if last && ps != nil {
		ctx, cancel := context.WithTimeout(context.Background(), s.hc)
		_ = ps.Unsubscribe(ctx, s.channel)
		cancel()
	}
}

// channels returns the channels registered and the shortest health check
// among their subscribers.
func (h *hub) channels() ([]string, time.Duration) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var chs []string
	var hc time.Duration
	for ch, m := range h.subs {
		chs = append(chs, ch)
		for s := range m {
			if hc == 0 || s.hc < hc {
				hc = s.hc
			}
		}
	}
	return chs, hc
}

// callSafe runs a subscriber's callback: a panic in one Cache's callback
// (its Recorder, its logger) must not break the connection the others
// share.
func callSafe(fn func()) {
	defer func() { _ = recover() }()
	fn()
}

// run keeps the connection until stop ends, subscribing again with a
// jittered backoff (10ms up to the health check) after each loss, and
// waiting while no channel is registered.
func (h *hub) run(stop context.Context) {
	defer close(h.done)
	const firstBackoff = 10 * time.Millisecond
	backoff := firstBackoff
	for stop.Err() == nil {
		chs, hc := h.channels()
		if len(chs) == 0 {
			select {
			case <-stop.Done():
				return
			case <-h.wake:
				continue
			}
		}
		confirmed, err := h.onceSafe(stop, chs, hc)
		if stop.Err() != nil {
			return
		}
		if confirmed {
			backoff = firstBackoff
		}
		h.lost(err)
		if sleep(stop, jitter(backoff)) != nil {
			return
		}
		backoff = min(2*backoff, hc)
	}
}

// lost ends the connection's state and tells every subscriber.
func (h *hub) lost(err error) {
	h.mu.Lock()
	h.ps = nil
	clear(h.confirmed)
	type one struct {
		s  *subscriber
		up bool
	}
	var all []one
	for _, m := range h.subs {
		for s := range m {
			all = append(all, one{s, h.wasUp[s]})
		}
	}
	clear(h.wasUp)
	h.mu.Unlock()
	for _, o := range all {
		callSafe(func() { o.s.down(err, o.up) })
	}
}

// confirm marks channel confirmed ("" for none: a PONG) and tells up
// every subscriber of a confirmed channel that has not been told yet.
func (h *hub) confirm(channel string) {
	h.mu.Lock()
	if channel != "" {
		h.confirmed[channel] = true
	}
	var up []*subscriber
	for ch := range h.confirmed {
		for s := range h.subs[ch] {
			if !h.wasUp[s] {
				h.wasUp[s] = true
				up = append(up, s)
			}
		}
	}
	h.mu.Unlock()
	for _, s := range up {
		callSafe(s.up)
	}
}

// deliver hands a message to the subscribers of its channel.
func (h *hub) deliver(channel, payload string) {
	h.mu.Lock()
	subs := make([]*subscriber, 0, len(h.subs[channel]))
	for s := range h.subs[channel] {
		subs = append(subs, s)
	}
	h.mu.Unlock()
	for _, s := range subs {
		callSafe(func() { s.message(payload) })
	}
}

// onceSafe is once with a panic (go-redis's Ring panics on Subscribe when
// no shard is up) turned into an error.
func (h *hub) onceSafe(stop context.Context, chs []string, hc time.Duration) (confirmed bool, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = panicIn("a subscription (a Ring without live shards)", r, debug.Stack())
		}
	}()
	return h.once(stop, chs, hc)
}

// once runs one connection until it fails, and returns why and whether a
// channel had been confirmed on it. Every call that may dial gets a
// deadline (with ContextTimeoutEnabled, go-redis puts it on the socket),
// so a Redis that accepts connections but never answers cannot hold
// Close.
func (h *hub) once(stop context.Context, chs []string, hc time.Duration) (confirmed bool, _ error) {
	ctx, cancel := context.WithTimeout(stop, hc)
	ps := h.bus.Subscribe(ctx, chs...)
	cancel()
	closeOnStop := context.AfterFunc(stop, func() { _ = ps.Close() })
	defer func() {
		closeOnStop()
		_ = ps.Close()
	}()
	// Channels registered while Subscribe ran are not on it yet: send
	// them now that the connection is published for later ones.
	h.mu.Lock()
	h.ps = ps
	var missed []string
	for ch := range h.subs {
		if !slices.Contains(chs, ch) {
			missed = append(missed, ch)
		}
	}
	h.mu.Unlock()
	if len(missed) > 0 {
		ctx, cancel := context.WithTimeout(stop, hc)
		err := ps.Subscribe(ctx, missed...)
		cancel()
		if err != nil {
			return false, err
		}
	}
	pinged := false
	for {
		ctx, cancel := context.WithTimeout(stop, 2*hc)
		msg, err := ps.ReceiveTimeout(ctx, hc)
		cancel()
		if err != nil {
			var ne net.Error
			if !pinged && errors.As(err, &ne) && ne.Timeout() && stop.Err() == nil {
				pinged = true
				ctx, cancel := context.WithTimeout(stop, hc)
				err := ps.Ping(ctx)
				cancel()
				if err != nil {
					return confirmed, err
				}
				continue
			}
			if pinged {
				return confirmed, fmt.Errorf("no PONG within %v: %w", hc, err)
			}
			return confirmed, err
		}
		pinged = false
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind == "subscribe" {
				confirmed = true
				h.confirm(m.Channel)
			}
		case *redis.Message:
			h.deliver(m.Channel, m.Payload)
		case *redis.Pong:
			h.confirm("") // a subscriber joined a confirmed channel (add)
		}
	}
}
