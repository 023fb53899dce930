from tensordiff.cli import main

main()
