#!/bin/sh
# generate.sh DIR N STATE: an mkfile in DIR linking N objects made by one `%.o: %.c` rule.
# STATE `fresh`: every object and `prog` newer than its sources (all up to date);
# STATE `stale`: sources only (everything out of date).
set -e
dir=$1
n=${2:-10000}
state=${3:-fresh}
rm -rf "$dir"
mkdir -p "$dir"
cd "$dir"
{
    printf 'OBJ='
    i=0
    while [ $i -lt $n ]; do printf ' f%d.o' $i; i=$((i+1)); done
    printf '\n\nprog: $OBJ\n\tcat $prereq > $target\n\n%%.o: %%.c\n\tcp $stem.c $target\n'
} > mkfile
i=0
while [ $i -lt $n ]; do : > f$i.c; i=$((i+1)); done
touch -d '2020-01-01 00:00:00' ./*.c
if [ "$state" = fresh ]; then
    i=0
    while [ $i -lt $n ]; do : > f$i.o; i=$((i+1)); done
    : > prog
    touch -d '2020-01-02 00:00:00' ./*.o
    touch -d '2020-01-03 00:00:00' prog
fi
