// Subscriptions: one pub/sub connection per client, shared by every Cache
// on it and by both of their channels (the local tier's invalidation bus
// and the wake channel), kept subscribed until the last Cache closes, with
// a health check; sharded pub/sub on a Cluster that has it.

package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"net"
	"reflect"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside/internal/wire"
)

// errNoChannels: connect found no channel to subscribe.
var errNoChannels = errors.New("no channel to subscribe")

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
//
// Sharded pub/sub. On a Redis Cluster a PUBLISH goes to every node over
// the cluster bus, however few subscribers there are. Redis 7's sharded
// pub/sub (SSUBSCRIBE, SPUBLISH) keeps a message inside the shard that
// owns its channel's slot. A hub on a Cluster client asks the server once
// (an SPUBLISH on wire.ShardProbe) and, where it has them, subscribes and
// publishes every channel that way, each name behind wire.ShardTag: all
// of them hash to one slot, so one connection to one shard still carries
// every channel of every Cache. Every process of a fleet asks the same
// server and gets the same answer, so they all hear each other. Fills
// cannot SPUBLISH from their script (a script may touch one slot only):
// on a sharded hub they report a contended lease and the Cache publishes
// its wake message after the script (wakeLater).

// subscriber is one Cache's interest in one channel: what to run when the
// subscription is confirmed (up), lost (down; confirmed says whether it
// had been up), and for each message. They all run on the hub's goroutine,
// one at a time and in order, and must not block.
type subscriber struct {
	channel string
	hc      time.Duration // silence before a PING; as long again for its PONG

	up      func()
	down    func(err error, confirmed bool)
	message func(payload string)
}

// run registers s with h and keeps it there until stop ends.
func (s *subscriber) run(h *hub, stop context.Context) {
	h.add(s)
	<-stop.Done()
	h.remove(s)
}

// hubs holds the live hubs by client value.
var hubs = struct {
	mu sync.Mutex // protects m and every hub's refs
	m  map[any]*hub
}{m: make(map[any]*hub)}

// hub is one client's shared subscription.
//
// Its state follows the commands on the wire. Every SUBSCRIBE and
// UNSUBSCRIBE is sent under wmu, together with the state change that asks
// for it, so the server sees them in the order the state changed; each
// counts as pending for its channel until its reply comes back (replies
// come in order). A channel is confirmed only by a "subscribe" reply that
// leaves nothing pending while it has subscribers, so a late reply to a
// SUBSCRIBE that an UNSUBSCRIBE has since undone confirms nothing. A write
// that fails closes the connection, so the loop's read fails and every
// subscriber hears down: go-redis would otherwise reconnect inside the
// PubSub and the messages of the gap would be lost without a word.
// Callbacks run under cbmu on the hub's goroutine, each after checking that
// its subscriber is still registered, and remove waits for cbmu, so no
// callback runs after a subscriber has left.
type hub struct {
	bus   pubsubClient
	shard shardedClient // the Cluster client's sharded pub/sub; nil: not a Cluster
	mode  atomic.Int32  // modeUnknown until the server answered the probe
	key   any           // in hubs.m; nil for a hub of its own
	refs  int           // under hubs.mu

	wmu  sync.Mutex // serializes writes on ps with the state changes behind them
	cbmu sync.Mutex // held while callbacks run

	mu        sync.Mutex
	subs      map[string]map[*subscriber]struct{} // channel → its subscribers
	ps        *redis.PubSub                       // the live connection; nil between connections
	pending   map[string]int                      // channel → SUBSCRIBE/UNSUBSCRIBE sent on ps, not yet answered
	confirmed map[string]bool                     // channels confirmed on ps
	wasUp     map[*subscriber]bool                // subscribers told up on ps
	hc        time.Duration                       // the shortest health check among the subscribers

	wake chan struct{} // a subscriber came: the loop may be waiting for one
	stop context.CancelFunc
	done chan struct{}
}

// The hub's kind of pub/sub: classic (SUBSCRIBE, PUBLISH) or sharded
// (SSUBSCRIBE, SPUBLISH), or not known yet.
const (
	modeUnknown int32 = iota
	modeClassic
	modeSharded
)

// shardedClient is what sharded pub/sub needs of a Cluster client:
// go-redis's ClusterClient has it. ForEachMaster marks the Cluster (a
// single-node Client has SSubscribe too, and needs none of this).
type shardedClient interface {
	SSubscribe(ctx context.Context, channels ...string) *redis.PubSub
	SPublish(ctx context.Context, channel string, message any) *redis.IntCmd
	ForEachMaster(ctx context.Context, fn func(context.Context, *redis.Client) error) error
}

// joinHub returns the hub of bus, made if it has none, holding one more
// reference to it: a Cache holds one from New until Close.
func joinHub(bus pubsubClient) *hub {
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
		pending: make(map[string]int), confirmed: make(map[string]bool), wasUp: make(map[*subscriber]bool),
		wake: make(chan struct{}, 1), stop: cancel, done: make(chan struct{})}
	h.shard, _ = bus.(shardedClient)
	if h.shard == nil {
		h.mode.Store(modeClassic)
	}
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

// sharded reports whether h publishes and subscribes by sharded pub/sub.
// On a Cluster client the first call asks the server, under ctx, with an
// SPUBLISH to a channel nobody hears: a reply means yes, a refusal
// (unknown command, ACL) means no; any other error is returned and the
// next call asks again. The answer holds until the connection is lost
// (lost), when the next connection asks again.
func (h *hub) sharded(ctx context.Context) (bool, error) {
	switch h.mode.Load() {
	case modeClassic:
		return false, nil
	case modeSharded:
		return true, nil
	}
	err := h.shard.SPublish(ctx, wire.ShardProbe, "").Err()
	switch {
	case err == nil:
		h.mode.CompareAndSwap(modeUnknown, modeSharded)
	case refusesPubSub(err):
		h.mode.CompareAndSwap(modeUnknown, modeClassic)
	default:
		return false, err
	}
	return h.mode.Load() == modeSharded, nil
}

// wireName is channel's name on the server.
func (h *hub) wireName(channel string) string {
	if h.mode.Load() == modeSharded {
		return wire.ShardTag + channel
	}
	return channel
}

// channelOf is the channel a name on the server stands for.
func (h *hub) channelOf(name string) string {
	if h.mode.Load() == modeSharded {
		return strings.TrimPrefix(name, wire.ShardTag)
	}
	return name
}

// publish sends msg on channel, by SPUBLISH on a sharded hub (to the
// channel's shard) or PUBLISH.
func (h *hub) publish(ctx context.Context, channel string, msg any) error {
	sharded, err := h.sharded(ctx)
	switch {
	case err != nil:
		return err
	case sharded:
		return h.shard.SPublish(ctx, wire.ShardTag+channel, msg).Err()
	}
	return h.bus.Publish(ctx, channel, msg).Err()
}

// healthCheckLocked recomputes h.hc; h.mu is held.
func (h *hub) healthCheckLocked() {
	h.hc = 0
	for _, m := range h.subs {
		for s := range m {
			if h.hc == 0 || s.hc < h.hc {
				h.hc = s.hc
			}
		}
	}
}

// add registers s. On a live connection its channel is subscribed at once
// if it is new there; if it is confirmed there already, a PING asks the
// hub's goroutine to tell s it is up (the PONG comes after every reply sent
// before it). Otherwise the next connection includes it.
func (h *hub) add(s *subscriber) {
	h.wmu.Lock()
	defer h.wmu.Unlock()
	h.mu.Lock()
	m := h.subs[s.channel]
	fresh := m == nil
	if fresh {
		m = make(map[*subscriber]struct{})
		h.subs[s.channel] = m
	}
	m[s] = struct{}{}
	h.healthCheckLocked()
	ps := h.ps
	ping := !fresh && h.confirmed[s.channel]
	if ps != nil && fresh {
		h.pending[s.channel]++
	}
	h.mu.Unlock()
	select {
	case h.wake <- struct{}{}:
	default:
	}
	if ps == nil || (!fresh && !ping) {
		return // the next connection, or the pending SUBSCRIBE's reply, tells s
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.hc)
	defer cancel()
	var err error
	switch {
	case fresh && h.mode.Load() == modeSharded:
		err = ps.SSubscribe(ctx, h.wireName(s.channel))
	case fresh:
		err = ps.Subscribe(ctx, s.channel)
	default:
		err = ps.Ping(ctx)
	}
	if err != nil {
		_ = ps.Close() // the loop hears it, and every subscriber with it
	}
}

// remove unregisters s, unsubscribes its channel when s was its last
// subscriber, and returns once no callback of s can run any more.
func (h *hub) remove(s *subscriber) {
	h.wmu.Lock()
	h.mu.Lock()
	m := h.subs[s.channel]
	delete(m, s)
	delete(h.wasUp, s)
	last := len(m) == 0
	if last {
		delete(h.subs, s.channel)
		delete(h.confirmed, s.channel)
	}
	h.healthCheckLocked()
	ps := h.ps
	if last && ps != nil {
		h.pending[s.channel]++
	}
	h.mu.Unlock()
	if last && ps != nil {
		ctx, cancel := context.WithTimeout(context.Background(), s.hc)
		var err error
		if h.mode.Load() == modeSharded {
			err = ps.SUnsubscribe(ctx, h.wireName(s.channel))
		} else {
			err = ps.Unsubscribe(ctx, s.channel)
		}
		if err != nil {
			_ = ps.Close()
		}
		cancel()
	}
	h.wmu.Unlock()
	h.afterCallbacks()
}

// afterCallbacks returns once a callback running now has ended: dispatch
// checks membership before each call, so later ones skip a subscriber
// that has left.
func (h *hub) afterCallbacks() {
	h.cbmu.Lock()
	defer h.cbmu.Unlock()
}

// dispatch runs fn for each of subs that is still registered, one at a
// time, under cbmu.
func (h *hub) dispatch(subs []*subscriber, fn func(s *subscriber)) {
	h.cbmu.Lock()
	defer h.cbmu.Unlock()
	for _, s := range subs {
		h.mu.Lock()
		_, ok := h.subs[s.channel][s]
		h.mu.Unlock()
		if ok {
			callSafe(func() { fn(s) })
		}
	}
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
		h.mu.Lock()
		empty, hc := len(h.subs) == 0, h.hc
		h.mu.Unlock()
		if empty {
			select {
			case <-stop.Done():
				return
			case <-h.wake:
				continue
			}
		}
		confirmed, err := h.onceSafe(stop)
		if stop.Err() != nil {
			return
		}
		if errors.Is(err, errNoChannels) {
			continue // nobody to tell: wait for a subscriber
		}
		if confirmed {
			backoff = firstBackoff
		}
		if r, ok := h.bus.(stateReloader); ok {
			// A Cluster: the channel's node may have failed over, and the
			// next connection must go to the node that serves it now.
			r.ReloadState(stop)
		}
		h.lost(err)
		if sleep(stop, spread(backoff)) != nil {
			return
		}
		backoff = min(2*backoff, hc)
	}
}

// lost ends the connection's state and tells every subscriber.
func (h *hub) lost(err error) {
	h.mu.Lock()
	h.ps = nil
	if h.shard != nil {
		// Ask again on the next connection: a Cluster upgraded from Redis 6
		// node by node, or an ACL changed, must not leave this process on
		// the other kind of pub/sub from processes that start later.
		h.mode.Store(modeUnknown)
	}
	clear(h.pending)
	clear(h.confirmed)
	var all []*subscriber
	wasUp := make(map[*subscriber]bool, len(h.wasUp))
	for _, m := range h.subs {
		for s := range m {
			all = append(all, s)
			wasUp[s] = h.wasUp[s]
		}
	}
	clear(h.wasUp)
	h.mu.Unlock()
	h.dispatch(all, func(s *subscriber) { s.down(err, wasUp[s]) })
}

// replied handles the server's reply to a SUBSCRIBE or UNSUBSCRIBE of
// channel (subscribed says which), or a PONG (channel ""): it confirms the
// channel when the reply leaves nothing pending and it still has
// subscribers, and tells up every subscriber of a confirmed channel that
// has not been told yet. An unsubscribe nobody asked for (the server
// drops a sharded channel whose slot it no longer serves) is returned as
// an error: the connection is lost for that channel's subscribers.
func (h *hub) replied(channel string, subscribed bool) error {
	h.mu.Lock()
	if channel != "" {
		asked := h.pending[channel] > 0
		if h.pending[channel]--; h.pending[channel] <= 0 {
			delete(h.pending, channel)
		}
		switch {
		case !subscribed && !asked && len(h.subs[channel]) > 0:
			h.mu.Unlock()
			return fmt.Errorf("the server ended the subscription to %s (its slot moved)", channel)
		case !subscribed:
			delete(h.confirmed, channel)
		case h.pending[channel] == 0 && len(h.subs[channel]) > 0:
			h.confirmed[channel] = true
		}
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
	h.dispatch(up, func(s *subscriber) { s.up() })
	return nil
}

// deliver hands a message to the subscribers of its channel.
func (h *hub) deliver(channel, payload string) {
	h.mu.Lock()
	subs := make([]*subscriber, 0, len(h.subs[channel]))
	for s := range h.subs[channel] {
		subs = append(subs, s)
	}
	h.mu.Unlock()
	h.dispatch(subs, func(s *subscriber) { s.message(payload) })
}

// onceSafe is once with a panic (go-redis's Ring panics on Subscribe when
// no shard is up) turned into an error.
func (h *hub) onceSafe(stop context.Context) (confirmed bool, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = panicIn("a subscription (a Ring without live shards)", r, debug.Stack())
		}
	}()
	return h.once(stop)
}

// connect opens a connection subscribed to every registered channel and
// publishes it, under wmu so that no SUBSCRIBE or UNSUBSCRIBE of add or
// remove falls between the two.
func (h *hub) connect(stop context.Context) (*redis.PubSub, time.Duration, error) {
	h.mu.Lock()
	hc := h.hc
	h.mu.Unlock()
	ctx, cancel := context.WithTimeout(stop, hc)
	defer cancel()
	sharded, err := h.sharded(ctx)
	if err != nil {
		return nil, hc, fmt.Errorf("asking for sharded pub/sub: %w", err)
	}
	h.wmu.Lock()
	defer h.wmu.Unlock()
	h.mu.Lock()
	chs := make([]string, 0, len(h.subs))
	for ch := range h.subs {
		chs = append(chs, ch)
	}
	hc = h.hc
	h.mu.Unlock()
	if len(chs) == 0 {
		// The last subscriber left while the server was asked: a
		// connection without channels would go to any node (a sharded
		// SSUBSCRIBE there is refused), so wait for a subscriber instead.
		return nil, hc, errNoChannels
	}
	var ps *redis.PubSub
	if sharded {
		names := make([]string, len(chs))
		for i, ch := range chs {
			names[i] = h.wireName(ch)
		}
		ps = h.shard.SSubscribe(ctx, names...)
	} else {
		ps = h.bus.Subscribe(ctx, chs...)
	}
	h.mu.Lock()
	h.ps = ps
	for _, ch := range chs {
		h.pending[ch]++
	}
	h.mu.Unlock()
	return ps, hc, nil
}

// once runs one connection until it fails, and returns why and whether a
// channel had been confirmed on it. Every call that may dial gets a
// deadline (with ContextTimeoutEnabled, go-redis puts it on the socket),
// so a Redis that accepts connections but never answers cannot hold
// Close.
func (h *hub) once(stop context.Context) (confirmed bool, _ error) {
	ps, hc, err := h.connect(stop)
	if err != nil {
		return false, err
	}
	closeOnStop := context.AfterFunc(stop, func() { _ = ps.Close() })
	defer func() {
		closeOnStop()
		_ = ps.Close()
	}()
	pinged := false
	for {
		h.mu.Lock()
		if h.hc > 0 {
			hc = h.hc // a subscriber with a shorter health check may have come
		}
		h.mu.Unlock()
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
			switch m.Kind {
			case "subscribe", "ssubscribe":
				confirmed = true
				_ = h.replied(h.channelOf(m.Channel), true)
			case "unsubscribe", "sunsubscribe":
				if err := h.replied(h.channelOf(m.Channel), false); err != nil {
					return confirmed, err
				}
			}
		case *redis.Message:
			h.deliver(h.channelOf(m.Channel), m.Payload)
		case *redis.Pong:
			_ = h.replied("", false) // a subscriber joined a confirmed channel (add), or the health check
		}
	}
}
