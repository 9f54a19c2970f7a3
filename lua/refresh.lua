-- refresh: take the lease on a value that is still being served, so one
-- caller reloads it while everyone else keeps reading the current value.
-- The entry becomes kind=refreshing with the caller's token and keeps its
-- own lifetime, so readers go on being served if the holder dies; the
-- lease's deadline (server time, in the header's load-time field, as
-- milliseconds mod 2^32) is what the holder renews. A refreshing entry
-- whose deadline has passed (its holder died) is taken over the same way.
-- KEYS[1]  the entry key
-- KEYS[2]  the namespace generation key (namespaced caches only)
-- ARGV[1]  token of the entry the caller read (a value's, or a dead
--          refresh holder's)
-- ARGV[2]  the caller's new 16-byte lease token
-- ARGV[3]  lease lifetime in milliseconds
-- ARGV[4]  lifetime of the generation key in milliseconds (namespaced caches)
-- ARGV[5]  '1' when the caller read a refreshing entry (to take over a dead
--          holder): a value under that token is the holder's fill, fresh,
--          and is not taken
-- Returns 1 when the caller holds the refresh lease (including a retry), else 0.
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function enc(d)
  d = d % 4294967296
  return string.char(math.floor(d / 16777216) % 256, math.floor(d / 65536) % 256, math.floor(d / 256) % 256, d % 256)
end
local cur = redis.pcall('GET', KEYS[1])
if type(cur) ~= 'string' or #cur < 40 then
  return 0
end
local kind = string.byte(cur, 3)
local tok = string.sub(cur, 5, 20)
if kind == 4 and tok == ARGV[2] then
  return 1
end
if ARGV[5] == '1' and kind == 1 then
  return 0
end
local takeover = false
if kind == 4 and tok == ARGV[1] then
  local a, b, c, d = string.byte(cur, 29, 32)
  local deadline = ((a * 256 + b) * 256 + c) * 256 + d
  takeover = (now() - deadline) % 4294967296 < 2147483648
end
if not takeover and (kind ~= 1 or tok ~= ARGV[1]) then
  return 0
end
if #KEYS > 1 then
  local gen = redis.pcall('GET', KEYS[2])
  if type(gen) ~= 'string' or gen ~= string.sub(cur, 33, 40) then
    return 0
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
local life = redis.call('PTTL', KEYS[1])
if life < tonumber(ARGV[3]) then
  life = tonumber(ARGV[3])
end
redis.call('SET', KEYS[1], string.sub(cur, 1, 2) .. '\4' .. string.sub(cur, 4, 4) .. ARGV[2] ..
  string.sub(cur, 21, 28) .. enc(now() + tonumber(ARGV[3])) .. string.sub(cur, 33), 'PX', life)
return 1
