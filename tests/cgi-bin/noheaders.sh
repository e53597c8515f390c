#!/bin/sh
echo "hello without headers"
