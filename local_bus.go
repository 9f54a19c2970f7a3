// The local tier's invalidation bus: messages, publishing after Redis applied
// an invalidation, and the subscription that keeps the tier coherent.

package cacheaside

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"

	"github.com/redis/go-redis/v9"
)

// Bus messages: a kind byte, then for msgKeys each key as a uvarint length
// and its bytes, for msgPrefix the prefix.
const (
	msgKeys      = 'k'
	msgPrefix    = 'p'
	msgNamespace = 'n' // followed by the namespace's generation key
)

func keysMessage(keys []string) []byte {
	n := 1
	for _, k := range keys {
		n += binary.MaxVarintLen64 + len(k)
	}
	b := make([]byte, 1, n)
	b[0] = msgKeys
	for _, k := range keys {
		b = binary.AppendUvarint(b, uint64(len(k)))
		b = append(b, k...)
	}
	return b
}

func prefixMessage(prefix string) []byte { return append([]byte{msgPrefix}, prefix...) }

// apply carries out one bus message. A message it cannot parse flushes the
// tier: something invalidated, and it cannot tell what. The message is
// counted once applied, so Stats.BusMessages never runs ahead of the tier.
func (l *localTier[T]) apply(msg string) error {
	defer l.ev.busMessage()
	if msg == "" {
		l.flush()
		return errors.New("empty message")
	}
	switch msg[0] {
	case msgPrefix:
		l.dropPrefix(msg[1:])
		return nil
	case msgNamespace:
		l.bump(msg[1:])
		return nil
	case msgKeys:
		rest := msg[1:]
		var keys []string
		for len(rest) > 0 {
			n, w := binary.Uvarint([]byte(rest[:min(len(rest), binary.MaxVarintLen64)]))
			if w <= 0 || uint64(len(rest)-w) < n {
				l.flush()
				return errors.New("truncated key list")
			}
			keys = append(keys, rest[w:w+int(n)])
			rest = rest[w+int(n):]
		}
		l.dropKeys(keys)
		return nil
	}
	l.flush()
	return fmt.Errorf("unknown message kind %q", msg[0])
}

// publish tells every Cache on the channel (this one included) what was
// invalidated, after Redis applied it. Its error matches ErrNotPublished
// (and ErrNoPubSub when the server refuses PUBLISH). Nothing is sent while
// the server refuses SUBSCRIBE: no process can be listening.
func (c *Cache[T]) publish(ctx context.Context, msg []byte, what string) error {
	if c.local.refused.Load() != nil {
		return nil
	}
	err := c.guard.publish(ctx, c.hub, c.local.opts.Channel, msg)
	if err == nil {
		return nil
	}
	// Redis quotes the arguments of a command it refuses: the message's
	// raw bytes must not reach a log line as they are.
	err = quotedError{err}
	if refusesPubSub(err) {
		c.pubsubRefused("PUBLISH", err)
		err = fmt.Errorf("%w: %w", ErrNoPubSub, err)
	}
	return fmt.Errorf("%w: %w", ErrNotPublished, c.redisError(ctx, "publish", what, err))
}

// refusesPubSub reports whether err is the server refusing a pub/sub
// command for good: unknown (renamed, disabled, a proxy without pub/sub)
// or not permitted (ACL). Such a reply will not change by retrying.
func refusesPubSub(err error) bool {
	var re redis.Error
	if !errors.As(err, &re) {
		return false
	}
	msg := re.Error()
	return strings.HasPrefix(msg, "ERR unknown command") || strings.HasPrefix(msg, "ERR unsupported command") ||
		strings.HasPrefix(msg, "NOPERM")
}

// pubsubRefused logs, once per Cache and command, that the server refuses
// cmd: a configuration error, at error level, naming the option it breaks.
func (c *Cache[T]) pubsubRefused(cmd string, err error) {
	once := &c.local.refusedSubscribe
	if cmd == "PUBLISH" {
		once = &c.local.refusedPublish
	}
	if once.Swap(true) {
		return
	}
	c.warn.LogAttrs(c.stop, slog.LevelError, "cacheaside: the Redis server refuses "+cmd+", so Options.Local cannot keep local tiers coherent: this cache's local tier stays bypassed (its Gets read Redis) and other processes are not told of its writes; allow pub/sub on the server (renamed commands, ACL, proxy) or remove Options.Local",
		slog.String("cache", c.name), slog.String("channel", c.local.opts.Channel), slog.Any("err", err))
}

// quotedError shows an error's text with control and non-UTF-8 bytes
// escaped, as Go quotes strings; Unwrap gives the error itself.
type quotedError struct{ err error }

func (e quotedError) Error() string {
	q := strconv.Quote(e.err.Error())
	return q[1 : len(q)-1]
}

func (e quotedError) Unwrap() error { return e.err }

// invalidated drops keys from this process's local tier and publishes them
// to the others. It is a no-op without a local tier.
func (c *Cache[T]) invalidated(ctx context.Context, keys []string) error {
	if c.local == nil {
		return nil
	}
	c.local.dropKeys(keys)
	return c.publish(ctx, keysMessage(keys), keysLabel(keys))
}

// invalidatedNamespace is invalidated for every key of the namespace
// whose generation key is genKey.
func (c *Cache[T]) invalidatedNamespace(ctx context.Context, genKey string) error {
	if c.local == nil {
		return nil
	}
	c.local.bump(genKey)
	return c.publish(ctx, append([]byte{msgNamespace}, genKey...), genKey)
}

// invalidatedPrefix is invalidated for every key starting with prefix.
func (c *Cache[T]) invalidatedPrefix(ctx context.Context, prefix string) error {
	if c.local == nil {
		return nil
	}
	c.local.dropPrefix(prefix)
	return c.publish(ctx, prefixMessage(prefix), prefix)
}

// listen keeps the subscription to the bus until Close, applying each
// message. Whenever the subscription may have missed a message (it failed,
// or stayed silent through a health check) the tier is flushed and stays
// bypassed until a new subscription is confirmed.
func (c *Cache[T]) listen() {
	defer c.wg.Done()
	l := c.local
	first := true
	s := &subscriber{channel: l.opts.Channel, hc: l.opts.HealthCheck,
		up: func() {
			// Whatever was published before this point is lost to us:
			// start from an empty tier.
			l.flush()
			l.refused.Store(nil)
			l.live.Store(true)
			if l.lost.Swap(false) {
				c.opts.Logger.LogAttrs(c.stop, slog.LevelInfo, "cacheaside: invalidation bus back; local tier in use again",
					slog.String("cache", c.name), slog.String("channel", l.opts.Channel))
			}
		},
		down: func(err error, confirmed bool) {
			l.live.Store(false)
			l.flush()
			if refusesPubSub(err) {
				// Not an outage: the tier stays bypassed, WaitLocal says
				// why, and the subscription is tried again now and then
				// (a server's configuration may change) without more logs.
				c.pubsubRefused("SUBSCRIBE", err) // logged before WaitLocal can report it
				l.refused.Store(&err)
				first = false
				return
			}
			c.busLost(err, confirmed || first)
			first = false
		},
		message: func(payload string) {
			if err := l.apply(payload); err != nil {
				c.report(c.stop, "bus", l.opts.Channel, fmt.Errorf("invalidation message: %w; local tier flushed", err))
			}
		},
	}
	s.run(c.hub, c.stop)
	l.live.Store(false)
	l.flush()
}

// busLost reports a lost subscription: to the logger when it had been
// confirmed (or never was: the first try), otherwise only to the Recorder
// and Stats, so an outage logs the loss once and the return once. A
// panicking Recorder or logger must not end the process from this
// goroutine.
func (c *Cache[T]) busLost(err error, log bool) {
	defer func() { _ = recover() }()
	if log {
		c.local.lost.Store(true)
		c.opts.Logger.LogAttrs(c.stop, slog.LevelWarn, "cacheaside: invalidation bus lost; local tier bypassed until it is back",
			slog.String("cache", c.name), slog.String("channel", c.local.opts.Channel), slog.Any("err", err))
	}
	c.ev.redisError(c.stop, "subscribe", err)
}
