-- refresh: take the lease on a value that is still being served, so one
-- caller reloads it while everyone else keeps reading the current value.
-- The entry becomes kind=refreshing with the caller's token; its lifetime
-- becomes the lease lifetime, which the holder renews while it loads.
-- KEYS[1]  the entry key
-- KEYS[2]  the namespace generation key (namespaced caches only)
-- ARGV[1]  token of the value the caller read
-- ARGV[2]  the caller's new 16-byte lease token
-- ARGV[3]  lease lifetime in milliseconds
-- ARGV[4]  lifetime of the generation key in milliseconds (namespaced caches)
-- Returns 1 when the caller holds the refresh lease (including a retry), else 0.
local cur = redis.pcall('GET', KEYS[1])
if type(cur) ~= 'string' or #cur < 40 then
  return 0
end
local kind = string.byte(cur, 3)
local tok = string.sub(cur, 5, 20)
if kind == 4 and tok == ARGV[2] then
  return 1
end
if kind ~= 1 or tok ~= ARGV[1] then
  return 0
end
if #KEYS > 1 then
  local gen = redis.pcall('GET', KEYS[2])
  if type(gen) ~= 'string' or gen ~= string.sub(cur, 33, 40) then
    return 0
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call('SET', KEYS[1], string.sub(cur, 1, 2) .. '\4' .. string.sub(cur, 4, 4) .. ARGV[2] .. string.sub(cur, 21),
  'PX', ARGV[3])
return 1
